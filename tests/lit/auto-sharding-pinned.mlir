// RUN: meshweave-opt %s --split-input-file --pass-pipeline='install-mesh{shape=4},auto-sharding' | FileCheck %s

// Hand-written layouts (ManualShardingOption writes them as mw.pinned_sharding): the ILP keeps
// them and plans the rest around them.

// Left alone the ILP splits the weight's columns (auto-sharding.mlir, @forward_layer); pinned to
// its rows (Megatron's row-parallel layout) the argument keeps the rows: the plan pays for moving
// it where the dot wants it (an explicit all-to-all to columns, cheaper here than summing
// 32x256 partial products).
// CHECK-LABEL: func.func public @pinned_weight
// CHECK-SAME:    %arg0: tensor<256x256xf32> {mw.arg_path = "w1", mw.pinned_sharding = {{.*}}, sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}]>}
// CHECK:       stablehlo.dot_general
// CHECK-SAME:    mw.strategy = "[-,-] x [-,x] -> [-,x]"
func.func public @pinned_weight(%w1: tensor<256x256xf32> {mw.arg_path = "w1", mw.pinned_sharding = #sdy.sharding<@mesh, [{"x"}, {}]>},
                                %x: tensor<32x256xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64}) -> tensor<32x256xf32> {
  %0 = stablehlo.dot_general %x, %w1, contracting_dims = [1] x [0] : (tensor<32x256xf32>, tensor<256x256xf32>) -> tensor<32x256xf32>
  %1 = stablehlo.tanh %0 : tensor<32x256xf32>
  return %1 : tensor<32x256xf32>
}

// -----

// A pinned result: the plan ends in that layout, whatever it chose inside.
// CHECK-LABEL: func.func public @pinned_result
// CHECK-SAME:    -> (tensor<32x256xf32> {mw.pinned_sharding = {{.*}}, sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>})
func.func public @pinned_result(%w1: tensor<256x256xf32> {mw.arg_path = "w1"},
                                %x: tensor<32x256xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64})
    -> (tensor<32x256xf32> {mw.pinned_sharding = #sdy.sharding<@mesh, [{}, {}]>}) {
  %0 = stablehlo.dot_general %x, %w1, contracting_dims = [1] x [0] : (tensor<32x256xf32>, tensor<256x256xf32>) -> tensor<32x256xf32>
  return %0 : tensor<32x256xf32>
}

