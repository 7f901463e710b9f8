// RUN: meshweave-opt %s --split-input-file --mesh 4 --pass-pipeline='layer-clustering,stage-construction{num-stages=2},stage-outlining' | FileCheck %s
// RUN: expect-exit 1 meshweave-opt %s --split-input-file --mesh 4 --pass-pipeline='stage-outlining' 2>&1 | FileCheck %s --check-prefix=ORDER

// Each case is its own module (split-input-file); the entry function is the only public one.

// Two layers on two stages: each stage's forward ops move into a private fragment function on
// its mesh, the entry function calls them in order, and the constant both layers read is
// recomputed in each fragment instead of crossing meshes.
// CHECK-LABEL: func.func public @two_stages
// CHECK-NEXT:    %[[A:.*]] = call @s0_forward(%arg0, %arg1) {mw.mesh = "mesh0", mw.phase = "forward", mw.stage = 0 : i64}
// CHECK-NEXT:    %[[B:.*]] = call @s1_forward(%[[A]], %arg2) {mw.mesh = "mesh1", mw.phase = "forward", mw.stage = 1 : i64}
// CHECK-NEXT:    return %[[B]]
// CHECK-LABEL: func.func private @s0_forward
// CHECK-NEXT:    stablehlo.constant dense<2.000000e+00>
// CHECK-NEXT:    stablehlo.dot_general
// CHECK-NEXT:    stablehlo.multiply
// CHECK-LABEL: func.func private @s1_forward
// CHECK-NEXT:    stablehlo.constant dense<2.000000e+00>
// CHECK-NEXT:    stablehlo.dot_general
// ORDER: [stage-outlining] no stage assignment: run stage-construction first
module {
  func.func public @two_stages(%x: tensor<4x8xf32>, %w0: tensor<8x8xf32>, %w1: tensor<8x8xf32>) -> tensor<4x8xf32> {
    %c = stablehlo.constant dense<2.0> : tensor<4x8xf32>
    %0 = stablehlo.dot_general %x, %w0, contracting_dims = [1] x [0] : (tensor<4x8xf32>, tensor<8x8xf32>) -> tensor<4x8xf32>
    %a = stablehlo.multiply %0, %c : tensor<4x8xf32>
    %1 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0"}} %a : tensor<4x8xf32>
    %2 = stablehlo.dot_general %1, %w1, contracting_dims = [1] x [0] : (tensor<4x8xf32>, tensor<8x8xf32>) -> tensor<4x8xf32>
    %3 = stablehlo.multiply %2, %c : tensor<4x8xf32>
    return %3 : tensor<4x8xf32>
  }
}

// -----

// Forward, backward and apply-grad of each stage become separate fragments; backward stages run
// in reverse order, apply-grad last; the gradient's producer returns it to the apply fragment.
// CHECK-LABEL: func.func public @forward_backward_apply
// CHECK-NEXT:    call @s0_forward({{.*}}) {mw.mesh = "mesh0", mw.phase = "forward", mw.stage = 0 : i64}
// CHECK-NEXT:    call @s1_forward({{.*}}) {mw.mesh = "mesh1", mw.phase = "forward", mw.stage = 1 : i64}
// CHECK-NEXT:    call @s1_backward({{.*}}) {mw.mesh = "mesh1", mw.phase = "backward", mw.stage = 1 : i64}
// CHECK-NEXT:    call @s0_backward({{.*}}) {mw.mesh = "mesh0", mw.phase = "backward", mw.stage = 0 : i64}
// CHECK-NEXT:    call @s0_apply({{.*}}) {mw.mesh = "mesh0", mw.phase = "apply", mw.stage = 0 : i64}
module {
  func.func public @forward_backward_apply(%x: tensor<4xf32>, %w: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>) {
    %0 = stablehlo.multiply %x, %w : tensor<4xf32>
    %1 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0"}} %0 : tensor<4xf32>
    %2 = stablehlo.tanh %1 : tensor<4xf32>
    %3 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss"}} %2 : tensor<4xf32>
    %c = stablehlo.constant dense<1.0> : tensor<4xf32>
    %4 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss.bwd"}} %c : tensor<4xf32>
    %5 = stablehlo.multiply %4, %2 : tensor<4xf32>
    %6 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0.bwd"}} %5 : tensor<4xf32>
    %7 = stablehlo.multiply %6, %x : tensor<4xf32>
    %8:2 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "grad", mw.name = "grad"}} %3, %7 : tensor<4xf32>, tensor<4xf32>
    %9 = stablehlo.subtract %w, %8#1 : tensor<4xf32>
    return %8#0, %9 : tensor<4xf32>, tensor<4xf32>
  }
}

// -----

// What the backward could rebuild for free is not held from the forward: the bf16 weight's f32
// view is recomputed from the weight, and the broadcast of a row slice (8x its operand) from the
// slice, so the forward hands the backward a 4x1 value instead of two 8-wide ones.
// CHECK-LABEL: func.func public @parameter_views_recomputed
// CHECK-LABEL: func.func private @s1_forward(%arg0: tensor<4x8xf32>, %arg1: tensor<8x8xbf16>) -> (tensor<4x1xf32>, tensor<4x8xf32>)
// CHECK-LABEL: func.func private @s1_backward(%arg0: tensor<4x8xf32>, %arg1: tensor<4x1xf32>, %arg2: tensor<8x8xbf16>) -> tensor<8x8xbf16>
// CHECK-DAG:     stablehlo.broadcast_in_dim %arg1, dims = [0, 1] : (tensor<4x1xf32>) -> tensor<4x8xf32>
// CHECK-DAG:     stablehlo.convert %arg2 : (tensor<8x8xbf16>) -> tensor<8x8xf32>
// CHECK:         return
module {
  func.func public @parameter_views_recomputed(%x: tensor<4x8xf32>, %w: tensor<8x8xbf16>) -> (tensor<4x8xf32>, tensor<8x8xbf16>) {
    %0 = stablehlo.multiply %x, %x : tensor<4x8xf32>
    %1 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0"}} %0 : tensor<4x8xf32>
    %wf = stablehlo.convert %w : (tensor<8x8xbf16>) -> tensor<8x8xf32>
    %2 = stablehlo.dot_general %1, %wf, contracting_dims = [1] x [0] : (tensor<4x8xf32>, tensor<8x8xf32>) -> tensor<4x8xf32>
    %s = stablehlo.slice %2 [0:4, 0:1] : (tensor<4x8xf32>) -> tensor<4x1xf32>
    %b = stablehlo.broadcast_in_dim %s, dims = [0, 1] : (tensor<4x1xf32>) -> tensor<4x8xf32>
    %3 = stablehlo.multiply %2, %b : tensor<4x8xf32>
    %4 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss"}} %3 : tensor<4x8xf32>
    %c = stablehlo.constant dense<1.0> : tensor<4x8xf32>
    %5 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss.bwd"}} %c : tensor<4x8xf32>
    %6 = stablehlo.multiply %5, %b : tensor<4x8xf32>
    %dw = stablehlo.dot_general %1, %6, contracting_dims = [0] x [0] : (tensor<4x8xf32>, tensor<4x8xf32>) -> tensor<8x8xf32>
    %dwm = stablehlo.multiply %dw, %wf : tensor<8x8xf32>
    %dwb = stablehlo.convert %dwm : (tensor<8x8xf32>) -> tensor<8x8xbf16>
    %10:2 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "grad", mw.name = "grad"}} %4, %dwb : tensor<4x8xf32>, tensor<8x8xbf16>
    %11 = stablehlo.subtract %w, %10#1 : tensor<8x8xbf16>
    return %10#0, %11 : tensor<4x8xf32>, tensor<8x8xbf16>
  }
}
