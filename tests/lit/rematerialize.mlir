// RUN: meshweave-opt %s --split-input-file --pass-pipeline='layer-clustering,rematerialize{layers=all}' | FileCheck %s
// RUN: meshweave-opt %s --split-input-file --mesh 4 --pass-pipeline='layer-clustering,stage-construction{num-stages=2},rematerialize{layers=all},stage-outlining' | FileCheck %s --check-prefix=FRAG
// RUN: meshweave-opt %s --split-input-file --mesh 4 --pass-pipeline='layer-clustering,stage-construction{num-stages=2},rematerialize{layers=1},stage-outlining' | FileCheck %s --check-prefix=ONE
// RUN: expect-exit 1 meshweave-opt %s --split-input-file --pass-pipeline='rematerialize{layers=all}' 2>&1 | FileCheck %s --check-prefix=ORDER
// RUN: expect-exit 1 meshweave-opt %s --split-input-file --pass-pipeline='layer-clustering,rematerialize{layers=0,7}' 2>&1 | FileCheck %s --check-prefix=RANGE

// Each case is its own module (split-input-file); the entry function is the only public one.

// Layer 0 computes sin(x * w); its backward needs cos(x * w). Rematerialized, the backward clones
// the product (tagged backward, same layer) right before its first reader and takes the cosine of
// the clone; the forward's cosine, read by nobody now, is gone. Layer 1's tanh is recomputed the
// same way. Ops reading other layers' values (the boundary %1) keep reading them.
// CHECK-LABEL: func.func public @recompute_in_backward
// CHECK:         %[[P:.*]] = stablehlo.multiply %arg0, %arg1 {mw.layer = 0 : i64, mw.phase = "forward"}
// CHECK-NEXT:    %[[S:.*]] = stablehlo.sine %[[P]] {mw.layer = 0 : i64, mw.phase = "forward"}
// CHECK-NOT:     stablehlo.cosine {{.*}}"forward"
// CHECK:         %[[M:.*]] = stablehlo.multiply %[[S]], %arg2 {mw.layer = 1 : i64, mw.phase = "backward"}
// CHECK-NEXT:    %[[T:.*]] = stablehlo.tanh %[[M]] {mw.layer = 1 : i64, mw.phase = "backward"}
// CHECK:         stablehlo.multiply {{.*}}, %[[S]] {mw.accumulate = [0], mw.layer = 1 : i64, mw.phase = "backward"}
// CHECK:         %[[P2:.*]] = stablehlo.multiply %arg0, %arg1 {mw.layer = 0 : i64, mw.phase = "backward"}
// CHECK-NEXT:    %[[C:.*]] = stablehlo.cosine %[[P2]] {mw.layer = 0 : i64, mw.phase = "backward"}
// CHECK-NEXT:    stablehlo.multiply {{.*}}, %[[C]] {mw.layer = 0 : i64, mw.phase = "backward"}

// After outlining, each backward fragment reads parameters, batch values and the activation that
// enters its stage (%0, stage 0's output) only: no residual of its own forward. The forward
// fragments return just what the next stage and apply-grad read.
// FRAG-LABEL: func.func public @recompute_in_backward
// FRAG-NEXT:    %[[A:.*]] = call @s0_forward(%arg0, %arg1)
// FRAG-NEXT:    %[[B:.*]] = call @s1_forward(%[[A]], %arg2)
// FRAG-NEXT:    %[[G:.*]]:2 = call @s1_backward(%[[A]], %arg2)
// FRAG-NEXT:    call @s0_backward(%arg0, %arg1, %[[G]]#1)
// FRAG-LABEL: func.func private @s0_forward
// FRAG-SAME:    -> tensor<4xf32>
// FRAG-NOT:     stablehlo.cosine
// FRAG:         return
// FRAG-LABEL: func.func private @s0_backward
// FRAG-NEXT:    stablehlo.multiply %arg0, %arg1
// FRAG-NEXT:    stablehlo.cosine

// Only layer 1 rematerialized: layer 0's backward still reads the product its forward kept.
// ONE-LABEL: func.func public @recompute_in_backward
// ONE:         %[[F:.*]]:2 = call @s0_forward(%arg0, %arg1)
// ONE:         call @s1_backward(%[[F]]#0, %arg2)
// ONE:         call @s0_backward({{.*}}, %[[F]]#1, %arg0)
// ORDER: [rematerialize] no layers: run layer-clustering first
// RANGE: [rematerialize] layers='0,7': layer(s) [7] do not exist (the step has layers 0..1)
module {
  func.func public @recompute_in_backward(%x: tensor<4xf32>, %w: tensor<4xf32>, %v: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>, tensor<4xf32>) {
    %0 = stablehlo.multiply %x, %w : tensor<4xf32>
    %s = stablehlo.sine %0 : tensor<4xf32>
    %1 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0"}} %s : tensor<4xf32>
    %m = stablehlo.multiply %1, %v : tensor<4xf32>
    %2 = stablehlo.tanh %m : tensor<4xf32>
    %3 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss"}} %2 : tensor<4xf32>
    %c = stablehlo.constant dense<1.0> : tensor<4xf32>
    %4 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss.bwd"}} %c : tensor<4xf32>
    %5 = stablehlo.multiply %4, %2 : tensor<4xf32>
    %gv = stablehlo.multiply %5, %1 : tensor<4xf32>
    %d1 = stablehlo.multiply %5, %v : tensor<4xf32>
    %6 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0.bwd"}} %d1 : tensor<4xf32>
    %cos = stablehlo.cosine %0 : tensor<4xf32>
    %7 = stablehlo.multiply %6, %cos : tensor<4xf32>
    %gw = stablehlo.multiply %7, %x : tensor<4xf32>
    %8:3 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "grad", mw.name = "grad"}} %3, %gw, %gv : tensor<4xf32>, tensor<4xf32>, tensor<4xf32>
    %9 = stablehlo.subtract %w, %8#1 : tensor<4xf32>
    %10 = stablehlo.subtract %v, %8#2 : tensor<4xf32>
    return %8#0, %9, %10 : tensor<4xf32>, tensor<4xf32>, tensor<4xf32>
  }
}

// -----

// Dropout's bits come from a pure generator (rng_bit_generator: same state, same bits), so the
// mask is recomputed; `stablehlo.rng` is not a function of its operands, so its result stays a
// residual the backward reads from the forward.
// CHECK-LABEL: func.func public @random_bits
// CHECK:         stablehlo.rng_bit_generator {{.*}}"backward"
// CHECK-NOT:     stablehlo.rng %{{.*}}"backward"
// FRAG-LABEL: func.func public @random_bits
// FRAG:         %[[F:.*]]:2 = call @s0_forward
// FRAG:         call @s0_backward({{.*}}%[[F]]#0,
module {
  func.func public @random_bits(%x: tensor<4xf32>, %state: tensor<2xui64>, %lo: tensor<f32>, %hi: tensor<f32>) -> (tensor<4xf32>, tensor<4xf32>) {
    %s2, %bits = stablehlo.rng_bit_generator %state, algorithm = THREE_FRY : (tensor<2xui64>) -> (tensor<2xui64>, tensor<4xui32>)
    %f = stablehlo.convert %bits : (tensor<4xui32>) -> tensor<4xf32>
    %shape = stablehlo.constant dense<4> : tensor<1xi64>
    %u = stablehlo.rng %lo, %hi, %shape, distribution = UNIFORM : (tensor<f32>, tensor<f32>, tensor<1xi64>) -> tensor<4xf32>
    %a = stablehlo.multiply %x, %f : tensor<4xf32>
    %b = stablehlo.multiply %a, %u : tensor<4xf32>
    %1 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0"}} %b : tensor<4xf32>
    %2 = stablehlo.tanh %1 : tensor<4xf32>
    %3 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss"}} %2 : tensor<4xf32>
    %c = stablehlo.constant dense<1.0> : tensor<4xf32>
    %4 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss.bwd"}} %c : tensor<4xf32>
    %5 = stablehlo.multiply %4, %2 : tensor<4xf32>
    %6 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0.bwd"}} %5 : tensor<4xf32>
    %7 = stablehlo.multiply %6, %u : tensor<4xf32>
    %8 = stablehlo.multiply %7, %f : tensor<4xf32>
    %9:2 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "grad", mw.name = "grad"}} %3, %8 : tensor<4xf32>, tensor<4xf32>
    return %9#0, %9#1 : tensor<4xf32>, tensor<4xf32>
  }
}
