// RUN: meshweave-opt %s --split-input-file --mesh 4 --pass-pipeline='layer-clustering,stage-construction{num-stages=2},stage-outlining,insert-transfers' | FileCheck %s
// RUN: expect-exit 1 meshweave-opt %s --split-input-file --mesh 4 --pass-pipeline='insert-transfers' 2>&1 | FileCheck %s --check-prefix=ORDER

// Each case is its own module (split-input-file); the entry function is the only public one.

// The entry function takes the mpmd form: every value is a mesh tensor on the mesh that makes
// it (arguments: on the first mesh that reads them), every fragment call runs on its mesh, and
// a value read on another mesh crosses once, through one mpmd.transfer, however many
// fragments there read it (the activation %[[A]] feeds both the forward and the backward of
// stage 1 but is transferred once; the weight %arg1 is read by both stages and transferred once).
// CHECK-LABEL: func.func public @one_transfer_per_value
// CHECK-SAME:    %arg0: !mpmd.mesh_tensor<"mesh0", tensor<4xf32>>
// CHECK-SAME:    %arg1: !mpmd.mesh_tensor<"mesh0", tensor<4xf32>>
// CHECK-SAME:    topology = #mpmd.topology<<"mesh0" : <["x"=2]>>, <"mesh1" : <["x"=2]>>>
// CHECK-NEXT:    %[[A:.*]] = mpmd.fragment_call<mesh="mesh0", origin=["s0_forward"]> @s0_forward(%arg0, %arg1)
// CHECK-NEXT:    %[[T:.*]] = mpmd.transfer %[[A]] : (!mpmd.mesh_tensor<"mesh0", tensor<4xf32>>) -> !mpmd.mesh_tensor<"mesh1", tensor<4xf32>>
// CHECK-NEXT:    %[[W:.*]] = mpmd.transfer %arg1 : (!mpmd.mesh_tensor<"mesh0", tensor<4xf32>>) -> !mpmd.mesh_tensor<"mesh1", tensor<4xf32>>
// CHECK-NEXT:    mpmd.fragment_call<mesh="mesh1", origin=["s1_forward"]> @s1_forward(%[[T]], %[[W]])
// CHECK-NEXT:    mpmd.fragment_call<mesh="mesh1", origin=["s1_backward"]> @s1_backward({{.*}}%[[T]]
// CHECK-NOT:     mpmd.transfer %[[A]]
// CHECK:         mpmd.fragment_call<mesh="mesh0", origin=["s0_backward"]>
// CHECK-LABEL: func.func private @s0_forward
// CHECK-SAME:    mesh_shape = #sdy.mesh<["x"=2]>
// ORDER: [insert-transfers] no stages: run stage-construction and stage-outlining first
module {
  func.func public @one_transfer_per_value(%x: tensor<4xf32>, %w: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>) {
    %0 = stablehlo.multiply %x, %w : tensor<4xf32>
    %1 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0"}} %0 : tensor<4xf32>
    %2 = stablehlo.multiply %1, %w : tensor<4xf32>
    %3 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss"}} %2 : tensor<4xf32>
    %c = stablehlo.constant dense<1.0> : tensor<4xf32>
    %4 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "loss", mw.name = "loss.bwd"}} %c : tensor<4xf32>
    %5 = stablehlo.multiply %4, %1 : tensor<4xf32>
    %6 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0.bwd"}} %5 : tensor<4xf32>
    %7 = stablehlo.multiply %6, %x : tensor<4xf32>
    return %3, %7 : tensor<4xf32>, tensor<4xf32>
  }
}
