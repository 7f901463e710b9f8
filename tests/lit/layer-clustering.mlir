// RUN: meshweave-opt %s --split-input-file --pass-pipeline='layer-clustering' | FileCheck %s
// RUN: meshweave-opt %s --split-input-file --pass-pipeline='layer-clustering{micro-batches=2}' | FileCheck %s --check-prefix=MEAN

// Each case is its own module (split-input-file); the entry function is the only public one.

// A boundary marker starts layer 1: ops before it are layer 0, ops after it layer 1, and the
// marker itself is gone.
// CHECK-LABEL: func.func public @two_forward_layers
// CHECK-NEXT:    %[[A:.*]] = stablehlo.dot_general %arg0, %arg1
// CHECK-SAME:      {mw.layer = 0 : i64, mw.phase = "forward"}
// CHECK-NEXT:    %[[B:.*]] = stablehlo.dot_general %[[A]], %arg2
// CHECK-SAME:      {mw.layer = 1 : i64, mw.phase = "forward"}
// CHECK-NOT:     mw.marker
module {
  func.func public @two_forward_layers(%x: tensor<4x8xf32>, %w0: tensor<8x8xf32>, %w1: tensor<8x8xf32>) -> tensor<4x8xf32> {
    %0 = stablehlo.dot_general %x, %w0, contracting_dims = [1] x [0] : (tensor<4x8xf32>, tensor<8x8xf32>) -> tensor<4x8xf32>
    %1 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0"}} %0 : tensor<4x8xf32>
    %2 = stablehlo.dot_general %1, %w1, contracting_dims = [1] x [0] : (tensor<4x8xf32>, tensor<8x8xf32>) -> tensor<4x8xf32>
    return %2 : tensor<4x8xf32>
  }
}

// -----

// The "loss" marker ends the forward pass; its ".bwd" twin starts the backward pass, which runs
// from the last layer down: each ".bwd" boundary crossed moves one layer earlier.
// CHECK-LABEL: func.func public @backward_pairs_with_forward
// CHECK:         stablehlo.multiply %arg0, %arg1 {mw.layer = 0 : i64, mw.phase = "forward"}
// CHECK-NEXT:    stablehlo.tanh {{.*}} {mw.layer = 1 : i64, mw.phase = "forward"}
// CHECK:         stablehlo.multiply {{.*}} {mw.layer = 1 : i64, mw.phase = "backward"}
// CHECK-NEXT:    stablehlo.multiply {{.*}} {mw.layer = 0 : i64, mw.phase = "backward"}
module {
  func.func public @backward_pairs_with_forward(%x: tensor<4xf32>, %w: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>) {
    %0 = stablehlo.multiply %x, %w : tensor<4xf32>
    %1 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0"}} %0 : tensor<4xf32>
    %2 = stablehlo.tanh %1 : tensor<4xf32>
    %3 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss"}} %2 : tensor<4xf32>
    %c = stablehlo.constant dense<1.0> : tensor<4xf32>
    %4 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss.bwd"}} %c : tensor<4xf32>
    %5 = stablehlo.multiply %4, %2 : tensor<4xf32>
    %6 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0.bwd"}} %5 : tensor<4xf32>
    %7 = stablehlo.multiply %6, %x : tensor<4xf32>
    return %3, %7 : tensor<4xf32>, tensor<4xf32>
  }
}

// -----

// Apply-grad ops (not ancestors of the "grad" marker) follow the gradient's layer; the marked
// value's producer is flagged for accumulation, and apply-grad reads its mean over micro-batches.
// MEAN-LABEL: func.func public @apply_reads_the_mean
// MEAN:         %[[G:.*]] = stablehlo.multiply %arg0, %arg1 {mw.accumulate = [0], mw.layer = 0 : i64, mw.phase = "forward"}
// MEAN-NEXT:    %[[H:.*]] = stablehlo.constant {mw.layer = 0 : i64, mw.phase = "apply"} dense<5.000000e-01>
// MEAN-NEXT:    %[[M:.*]] = stablehlo.multiply %[[G]], %[[H]] {mw.layer = 0 : i64, mw.phase = "apply"}
// MEAN-NEXT:    stablehlo.subtract %arg0, %[[M]] {mw.layer = 0 : i64, mw.phase = "apply"}
module {
  func.func public @apply_reads_the_mean(%w: tensor<4xf32>, %x: tensor<4xf32>) -> tensor<4xf32> {
    %0 = stablehlo.multiply %w, %x : tensor<4xf32>
    %1 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "grad", mw.name = "grad"}} %0 : tensor<4xf32>
    %2 = stablehlo.subtract %w, %1 : tensor<4xf32>
    return %2 : tensor<4xf32>
  }
}

