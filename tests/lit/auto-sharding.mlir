// RUN: meshweave-opt %s --pass-pipeline='install-mesh{shape=4},auto-sharding' | FileCheck %s
// RUN: meshweave-opt %s --pass-pipeline='install-mesh{shape=2x2},auto-sharding{batch-axes=y}' | FileCheck %s --check-prefix=FORCED
// RUN: expect-exit 1 meshweave-opt %s --pass-pipeline='install-mesh{shape=4},auto-sharding{batch-axes=z}' 2>&1 | FileCheck %s --check-prefix=BADAXIS
// RUN: expect-exit 2 meshweave-opt %s --pass-pipeline='auto-sharding{solver=glpk time-limit=x}' 2>&1 | FileCheck %s --check-prefix=BADOPT

// A forward pass: splitting the batch needs no communication, so the ILP shards the batch
// argument and every dot along it; the weights stay whole. Every planned op carries its
// chosen strategy and an sdy sharding.
// CHECK: func.func public @main(%arg0: tensor<256x256xf32> {{{.*}}sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>}
// CHECK-SAME: %arg2: tensor<32x256xf32> {{{.*}}sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}]>}
// CHECK: stablehlo.dot_general {{.*}}mw.strategy = "[x,-] x [-,-] -> [x,-]"{{.*}}sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{"x"}, {}]>]>
// CHECK: stablehlo.tanh {{.*}}sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{"x"}, {}]>]>
// CHECK: stablehlo.dot_general {{.*}}mw.strategy = "[x,-] x [-,-] -> [x,-]"
// CHECK-NOT: sdy.sharding_rule

// Forcing the batch onto mesh axis y (Alpa's force_batch_dim_to_mesh_dim).
// FORCED: %arg2: tensor<32x256xf32> {{{.*}}sdy.sharding = #sdy.sharding<@mesh, [{"y"{{.*}}}, {{.*}}]>}

// BADAXIS: batch-axes: 'z' is not an axis of mesh
// BADOPT: bad value 'x' for option 'time-limit'
module {
  func.func public @main(%w1: tensor<256x256xf32> {mw.arg_path = "params['w1']"},
                         %w2: tensor<256x256xf32> {mw.arg_path = "params['w2']"},
                         %x: tensor<32x256xf32> {mw.arg_path = "batch['x']", mw.batch_dim = 0 : i64}) -> tensor<32x256xf32> {
    %0 = stablehlo.dot_general %x, %w1, contracting_dims = [1] x [0] : (tensor<32x256xf32>, tensor<256x256xf32>) -> tensor<32x256xf32>
    %1 = stablehlo.tanh %0 : tensor<32x256xf32>
    %2 = stablehlo.dot_general %1, %w2, contracting_dims = [1] x [0] : (tensor<32x256xf32>, tensor<256x256xf32>) -> tensor<32x256xf32>
    return %2 : tensor<32x256xf32>
  }
}
