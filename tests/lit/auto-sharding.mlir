// RUN: meshweave-opt %s --split-input-file --pass-pipeline='install-mesh{shape=4},auto-sharding' | FileCheck %s
// RUN: meshweave-opt %s --split-input-file --pass-pipeline='install-mesh{shape=2x2},auto-sharding{batch-axes=y}' | FileCheck %s --check-prefix=FORCED
// RUN: meshweave-opt %s --split-input-file --pass-pipeline='install-mesh{shape=4},auto-sharding{batch-axes=x zero-stage=2 prefer-reduce-scatter=true}' | FileCheck %s --check-prefix=ZERO
// RUN: expect-exit 1 meshweave-opt %s --split-input-file --pass-pipeline='install-mesh{shape=4},auto-sharding{memory-budget=100000}' 2>&1 | FileCheck %s --check-prefix=BUDGET
// RUN: expect-exit 1 meshweave-opt %s --split-input-file --pass-pipeline='install-mesh{shape=4},auto-sharding{batch-axes=z}' 2>&1 | FileCheck %s --check-prefix=BADAXIS
// RUN: expect-exit 2 meshweave-opt %s --split-input-file --pass-pipeline='auto-sharding{solver=glpk time-limit=x}' 2>&1 | FileCheck %s --check-prefix=BADOPT

// Each case is its own module (split-input-file); the entry function is the only public one.

// A forward layer: with no memory limit the ILP splits the weight's output dimension; every
// planned op carries its chosen strategy and a closed sdy sharding, and no rule is left behind.
// CHECK-LABEL: func.func public @forward_layer
// CHECK-SAME:    %arg0: tensor<256x256xf32> {mw.arg_path = "w1", sdy.sharding = #sdy.sharding<@mesh, [{}, {"x"}]>}
// CHECK-SAME:    -> (tensor<32x256xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"x"}]>})
// CHECK-NEXT:  stablehlo.dot_general
// CHECK-SAME:    mw.strategy = "[-,-] x [-,x] -> [-,x]"
// CHECK-SAME:    sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {"x"}]>]>
// XLA's import drops an op's own sharding and propagates anew, so each result is also pinned.
// CHECK-NEXT:  sdy.sharding_constraint %{{.*}} <@mesh, [{}, {"x"}]>
// CHECK-NEXT:  stablehlo.tanh {{.*}}sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {"x"}]>]>
// CHECK-NEXT:  sdy.sharding_constraint %{{.*}} <@mesh, [{}, {"x"}]>
// CHECK-NOT:   sdy.sharding_rule
// Forced batch axis (Alpa's force_batch_dim_to_mesh_dim): the batch argument splits on y.
// FORCED-LABEL: func.func public @forward_layer
// FORCED-SAME:    %arg1: tensor<32x256xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64, sdy.sharding = #sdy.sharding<@mesh, [{"y"{{.*}}}, {{.*}}]>}
// Under a memory budget the only plan that fits splits the weight and the batch.
// BUDGET-LABEL: func.func public @forward_layer
// BUDGET-SAME:    sdy.sharding = #sdy.sharding<@mesh, [{}, {"x"}]>
// BUDGET-SAME:    sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}]>
func.func public @forward_layer(%w1: tensor<256x256xf32> {mw.arg_path = "w1"},
                                %x: tensor<32x256xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64}) -> tensor<32x256xf32> {
  %0 = stablehlo.dot_general %x, %w1, contracting_dims = [1] x [0] : (tensor<32x256xf32>, tensor<256x256xf32>) -> tensor<32x256xf32>
  %1 = stablehlo.tanh %0 : tensor<32x256xf32>
  return %1 : tensor<32x256xf32>
}

// -----

// A weight gradient (contraction over the batch): the plan splits the output rows, taking the
// x operand split on its feature dimension, so no all-reduce over the batch is needed.
// CHECK-LABEL: func.func public @weight_gradient
// CHECK-SAME:    %arg0: tensor<64x512xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64, sdy.sharding = #sdy.sharding<@mesh, [{}, {"x"}]>}
// CHECK:       stablehlo.dot_general
// CHECK-SAME:    mw.strategy = "[-,x] x [-,-] -> [x,-]"
// The 1 MiB result cannot fit 100 kB per device whatever the plan: the error names the floor.
// BUDGET: error: [auto-sharding] no sharding plan fits memory-budget=100000 bytes per device; the smallest budget the planner can meet is {{[0-9]+}} bytes (raise memory_budget_per_device to at least that, or use more devices)
func.func public @weight_gradient(%x: tensor<64x512xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64},
                                  %dy: tensor<64x512xf32> {mw.arg_path = "dy", mw.batch_dim = 0 : i64}) -> tensor<512x512xf32> {
  %0 = stablehlo.dot_general %x, %dy, contracting_dims = [0] x [0] : (tensor<64x512xf32>, tensor<64x512xf32>) -> tensor<512x512xf32>
  return %0 : tensor<512x512xf32>
}

// -----

// A counted while loop (fori_loop, 5 trips): ops in the body are planned like any other, and the
// carry keeps the batch split through the loop (the body's cost is paid per trip).
// CHECK-LABEL: func.func public @counted_loop
// CHECK-SAME:    %arg1: tensor<32x64xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64, sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}]>}
// CHECK:       stablehlo.while
// CHECK:       } do {
// CHECK:         stablehlo.dot_general
// CHECK-SAME:      mw.strategy = "[x,-] x [-,-] -> [x,-]"
// CHECK-NEXT:    sdy.sharding_constraint %{{.*}} <@mesh, [{"x"}, {}]>
// CHECK-NEXT:    stablehlo.tanh {{.*}}sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{"x"}, {}]>]>
func.func public @counted_loop(%w: tensor<64x64xf32> {mw.arg_path = "w"},
                               %x: tensor<32x64xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64}) -> tensor<32x64xf32> {
  %one = stablehlo.constant dense<1> : tensor<i32>
  %n = stablehlo.constant dense<5> : tensor<i32>
  %zero = stablehlo.constant dense<0> : tensor<i32>
  %0:3 = stablehlo.while(%wi = %w, %i = %zero, %h = %x) : tensor<64x64xf32>, tensor<i32>, tensor<32x64xf32>
  cond {
    %c = stablehlo.compare LT, %i, %n, SIGNED : (tensor<i32>, tensor<i32>) -> tensor<i1>
    stablehlo.return %c : tensor<i1>
  } do {
    %d = stablehlo.dot_general %h, %wi, contracting_dims = [1] x [0] : (tensor<32x64xf32>, tensor<64x64xf32>) -> tensor<32x64xf32>
    %t = stablehlo.tanh %d : tensor<32x64xf32>
    %next = stablehlo.add %i, %one : tensor<i32>
    stablehlo.return %wi, %next, %t : tensor<64x64xf32>, tensor<i32>, tensor<32x64xf32>
  }
  return %0#2 : tensor<32x64xf32>
}

// -----

// ZeRO-2 on a momentum step: the weight gradient (a sum over the batch) becomes a manual
// computation with an explicit reduce-scatter (its channel id numbered from the module), the
// momentum buffer is sharded, and the replicated parameter update pins its operand with a
// sharding constraint (the all-gather the plan paid for).
// ZERO-LABEL: func.func public @zero2_momentum_step
// ZERO-SAME:    %arg1: tensor<64x64xf32> {mw.arg_path = "m", sdy.sharding = #sdy.sharding<@mesh, [{}, {"x"}]>}
// ZERO:         sdy.manual_computation(%{{.*}}, %arg2) in_shardings=[<@mesh, [{"x"}, {}]>, <@mesh, [{"x"}, {}]>] out_shardings=[<@mesh, [{"x"}, {}]>] manual_axes={"x"}
// ZERO-NEXT:      stablehlo.dot_general {{.*}} -> tensor<64x64xf32>
// ZERO-NEXT:      "stablehlo.reduce_scatter"{{.*}}channel_handle = #stablehlo.channel_handle<handle = 1, type = 1>{{.*}}scatter_dimension = 0
// ZERO:           sdy.return {{.*}} : tensor<16x64xf32>
// ZERO:         sdy.sharding_constraint {{.*}} <@mesh, [{}, {}]> : tensor<64x64xf32>
// CHECK-LABEL: func.func public @zero2_momentum_step
func.func public @zero2_momentum_step(%arg0: tensor<64x64xf32> {mw.arg_path = "p"}, %arg1: tensor<64x64xf32> {mw.arg_path = "m"}, %arg2: tensor<32x64xf32> {mw.arg_path = "b", mw.batch_dim = 0 : i64}) -> (tensor<64x64xf32> {mw.keeps_arg = 0 : i64, mw.result_path = "result[0]"}, tensor<64x64xf32> {mw.keeps_arg = 1 : i64, mw.result_path = "result[1]"}, tensor<f32> {mw.result_path = "result[2]"}) {
  %cst = stablehlo.constant dense<1.000000e-01> : tensor<f32>
  %cst_0 = stablehlo.constant dense<0.899999976> : tensor<f32>
  %cst_1 = stablehlo.constant dense<1.000000e+00> : tensor<f32>
  %cst_2 = stablehlo.constant dense<2.048000e+03> : tensor<f32>
  %cst_3 = stablehlo.constant dense<0.000000e+00> : tensor<f32>
  %cst_4 = stablehlo.constant dense<2.000000e+00> : tensor<f32>
  %0 = stablehlo.dot_general %arg2, %arg0, contracting_dims = [1] x [0], precision = [DEFAULT, DEFAULT] : (tensor<32x64xf32>, tensor<64x64xf32>) -> tensor<32x64xf32>
  %1 = stablehlo.multiply %0, %0 : tensor<32x64xf32>
  %2 = stablehlo.broadcast_in_dim %cst_4, dims = [] : (tensor<f32>) -> tensor<32x64xf32>
  %3 = stablehlo.multiply %2, %0 : tensor<32x64xf32>
  %4 = stablehlo.reduce(%1 init: %cst_3) applies stablehlo.add across dimensions = [0, 1] : (tensor<32x64xf32>, tensor<f32>) -> tensor<f32>
  %5 = stablehlo.divide %4, %cst_2 : tensor<f32>
  %6 = stablehlo.divide %cst_1, %cst_2 : tensor<f32>
  %7 = stablehlo.broadcast_in_dim %6, dims = [] : (tensor<f32>) -> tensor<32x64xf32>
  %8 = stablehlo.multiply %7, %3 : tensor<32x64xf32>
  %9 = stablehlo.dot_general %8, %arg2, contracting_dims = [0] x [0], precision = [DEFAULT, DEFAULT] : (tensor<32x64xf32>, tensor<32x64xf32>) -> tensor<64x64xf32>
  %10 = stablehlo.transpose %9, dims = [1, 0] : (tensor<64x64xf32>) -> tensor<64x64xf32>
  %11 = stablehlo.broadcast_in_dim %cst_0, dims = [] : (tensor<f32>) -> tensor<64x64xf32>
  %12 = stablehlo.multiply %11, %arg1 : tensor<64x64xf32>
  %13 = stablehlo.add %12, %10 : tensor<64x64xf32>
  %14 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<64x64xf32>
  %15 = stablehlo.multiply %14, %13 : tensor<64x64xf32>
  %16 = stablehlo.subtract %arg0, %15 : tensor<64x64xf32>
  return %16, %13, %5 : tensor<64x64xf32>, tensor<64x64xf32>, tensor<f32>
}

// Error cases: a batch axis the mesh does not have; bad option values.
// BADAXIS: error: [auto-sharding] batch-axes: 'z' is not an axis of mesh
// BADOPT: bad value 'x' for option 'time-limit'

// -----

// A case (lax.switch): each branch's ops are planned like any others (the case has a rule and
// does not run replicated); every branch hands its value back in the result's planned layout,
// and the case's result is pinned to it.
// CHECK-LABEL: func.func public @switch_branches
// CHECK-SAME:    -> (tensor<32x64xf32> {sdy.sharding = #sdy.sharding<@mesh, [[[OUT:.*]]]>})
// CHECK:       "stablehlo.case"
// CHECK:         stablehlo.dot_general {{.*}}mw.strategy = "[[STRATEGY:[^"]+]]"
// CHECK:         sdy.sharding_constraint %{{.*}} <@mesh, [[[OUT]]]>
// CHECK-NEXT:    stablehlo.return
// CHECK:         stablehlo.tanh {{.*}}sdy.sharding = #sdy.sharding_per_value
// CHECK:         sdy.sharding_constraint %{{.*}} <@mesh, [[[OUT]]]>
// CHECK-NEXT:    stablehlo.return
// CHECK:       sdy.sharding_constraint %{{.*}} <@mesh, [[[OUT]]]>
// CHECK-NEXT:  return
func.func public @switch_branches(%w: tensor<64x64xf32> {mw.arg_path = "w"},
                                  %x: tensor<32x64xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64},
                                  %i: tensor<i32> {mw.arg_path = "i"}) -> tensor<32x64xf32> {
  %0 = "stablehlo.case"(%i) ({
    %d = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0] : (tensor<32x64xf32>, tensor<64x64xf32>) -> tensor<32x64xf32>
    stablehlo.return %d : tensor<32x64xf32>
  }, {
    %t = stablehlo.tanh %x : tensor<32x64xf32>
    stablehlo.return %t : tensor<32x64xf32>
  }) : (tensor<i32>) -> tensor<32x64xf32>
  return %0 : tensor<32x64xf32>
}
