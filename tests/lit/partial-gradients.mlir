// RUN: meshweave-opt %s --split-input-file --pass-pipeline='partial-gradients{results=0,1}' | FileCheck %s

// A weight gradient (dot over the batch split on x) and a bias gradient (add-reduce over it):
// each op runs on the local shards and the results stay partial over x.
// CHECK-LABEL: func.func @main
// CHECK-SAME: -> (tensor<8x4xbf16> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"y"}], unreduced={"x"}>}, tensor<4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}], unreduced={"x"}>})
// CHECK: %[[DOT:.*]] = sdy.manual_computation(%arg0, %arg1) in_shardings=[<@mesh, [{"x"}, {}]>, <@mesh, [{"x"}, {"y"}]>] out_shardings=[<@mesh, [{}, {"y"}], unreduced={"x"}>]
// CHECK: stablehlo.dot_general {{.*}} : (tensor<2x8xf32>, tensor<2x2xf32>) -> tensor<8x2xf32>
// CHECK: %[[CVT:.*]] = sdy.manual_computation(%[[DOT]]) in_shardings=[<@mesh, [{}, {"y"}], unreduced={"x"}>] out_shardings=[<@mesh, [{}, {"y"}], unreduced={"x"}>]
// CHECK: %[[RED:.*]] = sdy.manual_computation(%arg1, %{{.*}}) in_shardings=[<@mesh, [{"x"}, {}]>, <@mesh, []>] out_shardings=[<@mesh, [{}], unreduced={"x"}>]
// CHECK: return %[[CVT]], %[[RED]]
module {
  sdy.mesh @mesh = <["x"=4, "y"=2]>
  func.func @main(%a: tensor<8x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}]>}, %c: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}]>}) -> (tensor<8x4xbf16> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"y"}]>}, tensor<4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>}) {
    %0 = stablehlo.dot_general %a, %c, contracting_dims = [0] x [0] {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {"y"}]>]>} : (tensor<8x8xf32>, tensor<8x4xf32>) -> tensor<8x4xf32>
    %1 = stablehlo.convert %0 {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {"y"}]>]>} : (tensor<8x4xf32>) -> tensor<8x4xbf16>
    %z = stablehlo.constant dense<0.0> : tensor<f32>
    %r = stablehlo.reduce(%c init: %z) applies stablehlo.add across dimensions = [0] {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}]>]>} : (tensor<8x4xf32>, tensor<f32>) -> tensor<4xf32>
    return %1, %r : tensor<8x4xbf16>, tensor<4xf32>
  }
}

// -----

// Kept reduced: the contraction is not split (0), and a partial sum is also read by another op (1).
// CHECK-LABEL: func.func @main
// CHECK-SAME: -> (tensor<4x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}, tensor<4x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}, tensor<4x4xf32>
// CHECK-NOT: manual_computation
// CHECK-NOT: unreduced
module {
  sdy.mesh @mesh = <["x"=4]>
  func.func @main(%a: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}, %b: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}]>}) -> (tensor<4x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}, tensor<4x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}, tensor<4x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}) {
    %0 = stablehlo.dot_general %a, %a, contracting_dims = [0] x [0] {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {}]>]>} : (tensor<8x4xf32>, tensor<8x4xf32>) -> tensor<4x4xf32>
    %1 = stablehlo.dot_general %b, %b, contracting_dims = [0] x [0] {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {}]>]>} : (tensor<8x4xf32>, tensor<8x4xf32>) -> tensor<4x4xf32>
    %2 = stablehlo.exponential %1 {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {}]>]>} : tensor<4x4xf32>
    return %0, %1, %2 : tensor<4x4xf32>, tensor<4x4xf32>, tensor<4x4xf32>
  }
}

// -----

// An embedding gradient: a scatter-add of the batch's updates (split on x) into a zero table,
// plus a tied head's gradient (a dot over the batch): each device scatter-adds its own tokens
// into a local zero table and the sum stays partial over x.
// CHECK-LABEL: func.func @main
// CHECK-SAME: -> (tensor<16x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}], unreduced={"x"}>}, tensor<4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}], unreduced={"x"}>})
// CHECK: %[[SC:.*]] = sdy.manual_computation(%{{.*}}, %arg0, %arg1) in_shardings=[<@mesh, [{}, {}]>, <@mesh, [{"x"}, {}, {}]>, <@mesh, [{"x"}, {}, {}]>] out_shardings=[<@mesh, [{}, {}], unreduced={"x"}>]
// CHECK: "stablehlo.scatter"
// CHECK: }) : (tensor<16x4xf32>, tensor<2x3x1xi32>, tensor<2x3x4xf32>) -> tensor<16x4xf32>
// CHECK: %[[DOT:.*]] = sdy.manual_computation(%arg2, %arg3) {{.*}} out_shardings=[<@mesh, [{}, {}], unreduced={"x"}>]
// CHECK: %[[ADD:.*]] = sdy.manual_computation(%[[SC]], %[[DOT]]) in_shardings=[<@mesh, [{}, {}], unreduced={"x"}>, <@mesh, [{}, {}], unreduced={"x"}>] out_shardings=[<@mesh, [{}, {}], unreduced={"x"}>]
// CHECK: return %[[ADD]], %{{.*}}
module {
  sdy.mesh @mesh = <["x"=4]>
  func.func @main(%idx: tensor<8x3x1xi32> {sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}, {}]>}, %upd: tensor<8x3x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}, {}]>}, %a: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}]>}, %c: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}]>}) -> (tensor<16x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}, tensor<4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>}) {
    %z = stablehlo.constant dense<0.0> : tensor<f32>
    %t = stablehlo.broadcast_in_dim %z, dims = [] : (tensor<f32>) -> tensor<16x4xf32>
    %s = "stablehlo.scatter"(%t, %idx, %upd) <{indices_are_sorted = false, scatter_dimension_numbers = #stablehlo.scatter<update_window_dims = [2], inserted_window_dims = [0], scatter_dims_to_operand_dims = [0], index_vector_dim = 2>, unique_indices = false}> ({
    ^bb0(%p: tensor<f32>, %q: tensor<f32>):
      %r = stablehlo.add %p, %q : tensor<f32>
      stablehlo.return %r : tensor<f32>
    }) {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {}]>]>} : (tensor<16x4xf32>, tensor<8x3x1xi32>, tensor<8x3x4xf32>) -> tensor<16x4xf32>
    %d = stablehlo.dot_general %a, %c, contracting_dims = [0] x [0] {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {}]>]>} : (tensor<8x16xf32>, tensor<8x4xf32>) -> tensor<16x4xf32>
    %g = stablehlo.add %s, %d {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {}]>]>} : tensor<16x4xf32>
    %b = stablehlo.reduce(%c init: %z) applies stablehlo.add across dimensions = [0] {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}]>]>} : (tensor<8x4xf32>, tensor<f32>) -> tensor<4xf32>
    return %g, %b : tensor<16x4xf32>, tensor<4xf32>
  }
}

// -----

// Kept reduced: a scatter-add into a table that is not zero (each device would add it once),
// and one whose updates are not split (nothing to keep partial).
// CHECK-LABEL: func.func @main
// CHECK-NOT: manual_computation
// CHECK-NOT: unreduced
module {
  sdy.mesh @mesh = <["x"=4]>
  func.func @main(%w: tensor<16x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}, %idx: tensor<8x3x1xi32> {sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}, {}]>}, %upd: tensor<8x3x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}, {}]>}, %upd2: tensor<8x3x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}, {}]>}) -> (tensor<16x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}, tensor<16x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}) {
    %s = "stablehlo.scatter"(%w, %idx, %upd) <{indices_are_sorted = false, scatter_dimension_numbers = #stablehlo.scatter<update_window_dims = [2], inserted_window_dims = [0], scatter_dims_to_operand_dims = [0], index_vector_dim = 2>, unique_indices = false}> ({
    ^bb0(%p: tensor<f32>, %q: tensor<f32>):
      %r = stablehlo.add %p, %q : tensor<f32>
      stablehlo.return %r : tensor<f32>
    }) {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {}]>]>} : (tensor<16x4xf32>, tensor<8x3x1xi32>, tensor<8x3x4xf32>) -> tensor<16x4xf32>
    %z = stablehlo.constant dense<0.0> : tensor<16x4xf32>
    %s2 = "stablehlo.scatter"(%z, %idx, %upd2) <{indices_are_sorted = false, scatter_dimension_numbers = #stablehlo.scatter<update_window_dims = [2], inserted_window_dims = [0], scatter_dims_to_operand_dims = [0], index_vector_dim = 2>, unique_indices = false}> ({
    ^bb0(%p: tensor<f32>, %q: tensor<f32>):
      %r = stablehlo.add %p, %q : tensor<f32>
      stablehlo.return %r : tensor<f32>
    }) {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {}]>]>} : (tensor<16x4xf32>, tensor<8x3x1xi32>, tensor<8x3x4xf32>) -> tensor<16x4xf32>
    return %s, %s2 : tensor<16x4xf32>, tensor<16x4xf32>
  }
}
