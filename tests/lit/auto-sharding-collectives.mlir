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
