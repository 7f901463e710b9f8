// RUN: meshweave-opt %s --split-input-file --mesh 8 --pass-pipeline='layer-clustering,stage-construction{num-stages=2},stage-outlining,insert-transfers' | FileCheck %s
// RUN: meshweave-opt %s --split-input-file --mesh 8 --pass-pipeline='layer-clustering,stage-construction{num-stages=1},stage-outlining,insert-transfers' | FileCheck %s --check-prefix=ONE
// RUN: expect-exit 1 meshweave-opt %s --split-input-file --mesh 8 --pass-pipeline='layer-clustering,stage-construction{num-stages=3}' 2>&1 | FileCheck %s --check-prefix=TOOMANY
// RUN: expect-exit 1 meshweave-opt %s --split-input-file --pass-pipeline='layer-clustering,stage-construction{num-stages=2}' 2>&1 | FileCheck %s --check-prefix=NOMESH
// RUN: expect-exit 1 meshweave-opt %s --split-input-file --mesh 8 --pass-pipeline='stage-construction' 2>&1 | FileCheck %s --check-prefix=NOLAYERS

// Each case is its own module (split-input-file); the entry function is the only public one.

// Uniform stages split the 8 devices into two 4-device meshes, one per pair of layers; the
// mesh topology shows each stage's logical mesh.
// CHECK-LABEL: func.func public @four_layers
// CHECK-SAME:    topology = #mpmd.topology<<"mesh0" : <["x"=4]>>, <"mesh1" : <["x"=4]>>>
// CHECK:         mpmd.fragment_call<mesh="mesh0", origin=["s0_forward"]>
// CHECK:         mpmd.fragment_call<mesh="mesh1", origin=["s1_forward"]>
// One stage takes all layers and all devices.
// ONE-LABEL: func.func public @four_layers
// ONE-SAME:    topology = #mpmd.topology<<"mesh0" : <["x"=8]>>>
// ONE-NOT:     mpmd.transfer
// TOOMANY: [stage-construction] UniformStageOption: 4 layers do not split evenly into 3 stages; pick a divisor of 4 or use ManualStageOption
// NOMESH: [stage-construction] no cluster size: give devices-per-host=N (or --mesh to meshweave-opt)
// NOLAYERS: [stage-construction] run layer-clustering first
module {
  func.func public @four_layers(%x: tensor<4xf32>, %w: tensor<4xf32>) -> tensor<4xf32> {
    %0 = stablehlo.multiply %x, %w : tensor<4xf32>
    %1 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0"}} %0 : tensor<4xf32>
    %2 = stablehlo.multiply %1, %w : tensor<4xf32>
    %3 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b1"}} %2 : tensor<4xf32>
    %4 = stablehlo.multiply %3, %w : tensor<4xf32>
    %5 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b2"}} %4 : tensor<4xf32>
    %6 = stablehlo.multiply %5, %w : tensor<4xf32>
    return %6 : tensor<4xf32>
  }
}
