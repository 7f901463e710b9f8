// RUN: meshweave-opt %s --split-input-file --pass-pipeline='install-mesh{shape=4},auto-sharding' | FileCheck %s
// RUN: meshweave-opt %s --split-input-file --pass-pipeline='install-mesh{shape=4},auto-sharding{batch-axes=x zero-stage=2 prefer-reduce-scatter=true}' | FileCheck %s --check-prefix=ZERO

// How the plan is spelled out so that XLA does what the ILP priced: CHLO ops are decomposed
// (and planned like any elementwise op), and sum reductions may reduce-scatter. (The explicit
// all-to-all of expert parallelism is checked end to end in tests/test_plan_quality.py.)

// chlo.square: decomposed to a multiply that keeps its operand's split (no resharding: the one
// constraint pins the multiply's result to the layout it already has).
// CHECK-LABEL: func.func public @chlo_square
// CHECK-SAME:    sdy.sharding = #sdy.sharding<@mesh, [[[LAYOUT:.*]]]>}) ->
// CHECK-NOT:   chlo.square
// CHECK:       stablehlo.multiply {{.*}}sdy.sharding = #sdy.sharding_per_value<[<@mesh, [[[LAYOUT]]]>]>
// CHECK-NEXT:  sdy.sharding_constraint %{{.*}} <@mesh, [[[LAYOUT]]]>
// CHECK-NOT:   sdy.sharding_constraint
// CHECK:       return
func.func public @chlo_square(%x: tensor<32x16xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64}) -> tensor<32x16xf32> {
  %0 = chlo.square %x : tensor<32x16xf32> -> tensor<32x16xf32>
  return %0 : tensor<32x16xf32>
}

// -----

// A bias gradient (a sum over the batch) under ZeRO: the partial sums are reduce-scattered in a
// manual computation, not all-reduced.
// ZERO-LABEL: func.func public @bias_gradient
// ZERO:       sdy.manual_computation
// ZERO:       stablehlo.reduce
// ZERO:       "stablehlo.reduce_scatter"
// ZERO-SAME:    replica_groups = dense<{{\[\[}}0, 1, 2, 3]]>
// ZERO-NOT:   stablehlo.all_reduce
func.func public @bias_gradient(%g: tensor<32x64xf32> {mw.arg_path = "g", mw.batch_dim = 0 : i64},
                                %b: tensor<64xf32> {mw.arg_path = "b"}) -> tensor<64xf32> {
  %zero = stablehlo.constant dense<0.0> : tensor<f32>
  %0 = stablehlo.reduce(%g init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<32x64xf32>, tensor<f32>) -> tensor<64xf32>
  %1 = stablehlo.subtract %b, %0 : tensor<64xf32>
  return %1 : tensor<64xf32>
}

// -----

// A grouped convolution whose plan splits the groups (input features and kernel outputs pinned
// to x): each device holds whole groups and sums over none, so it runs in a manual computation
// with its own group count (4 groups over 4 devices: 1). Left to XLA, its partitioner gathered
// both operands.
// CHECK-LABEL: func.func public @grouped_conv
// CHECK:       sdy.manual_computation
// CHECK:       stablehlo.convolution
// CHECK-SAME:    feature_group_count = 1
// CHECK-SAME:    (tensor<8x8x8x4xf32>, tensor<3x3x4x8xf32>) -> tensor<8x8x8x8xf32>
// CHECK-NOT:   stablehlo.all_reduce
// CHECK:       return
func.func public @grouped_conv(%x: tensor<8x8x8x16xf32> {mw.arg_path = "x", mw.pinned_sharding = #sdy.sharding<@mesh, [{}, {}, {}, {"x"}]>},
                               %w: tensor<3x3x4x32xf32> {mw.arg_path = "w", mw.pinned_sharding = #sdy.sharding<@mesh, [{}, {}, {}, {"x"}]>})
    -> tensor<8x8x8x32xf32> {
  %0 = stablehlo.convolution(%x, %w) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f], window = {stride = [1, 1], pad = [[1, 1], [1, 1]], lhs_dilate = [1, 1], rhs_dilate = [1, 1], reverse = [false, false]} {batch_group_count = 1 : i64, feature_group_count = 4 : i64} : (tensor<8x8x8x16xf32>, tensor<3x3x4x32xf32>) -> tensor<8x8x8x32xf32>
  return %0 : tensor<8x8x8x32xf32>
}
