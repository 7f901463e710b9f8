// RUN: meshweave-opt %s --pass-pipeline='install-mesh{shape=2x4},data-parallel' | FileCheck %s
// RUN: meshweave-opt %s --pass-pipeline='install-mesh{shape=2x4},data-parallel{axes=y}' | FileCheck %s --check-prefix=AXIS
// RUN: expect-exit 1 meshweave-opt %s --pass-pipeline='install-mesh{shape=3},data-parallel' 2>&1 | FileCheck %s --check-prefix=UNEVEN

// The batch argument (mw.batch_dim) is split over both mesh axes; the weight stays replicated.
// CHECK: sdy.mesh @mesh = <["x"=2, "y"=4]>
// CHECK: func.func public @main(%arg0: tensor<16x8xf32> {{{.*}}sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}
// CHECK-SAME: %arg1: tensor<32x16xf32> {{{.*}}sdy.sharding = #sdy.sharding<@mesh, [{"x", "y"}, {}]>}
// AXIS: %arg1: tensor<32x16xf32> {{{.*}}sdy.sharding = #sdy.sharding<@mesh, [{"y"}, {}]>}
// UNEVEN: batch['x']: batch size 32 is not divisible by the data-parallel degree 3
module {
  func.func public @main(%w: tensor<16x8xf32> {mw.arg_path = "params['w']"},
                         %x: tensor<32x16xf32> {mw.arg_path = "batch['x']", mw.batch_dim = 0 : i64}) -> tensor<32x8xf32> {
    %0 = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0] : (tensor<32x16xf32>, tensor<16x8xf32>) -> tensor<32x8xf32>
    return %0 : tensor<32x8xf32>
  }
}
