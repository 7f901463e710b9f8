// RUN: expect-exit 1 meshweave-opt %s --pass-pipeline='install-mesh{shape=4},auto-sharding' 2>&1 | FileCheck %s

// Error cases of pinned layouts (a failing case stops meshweave-opt, so they live apart).

// A pinned layout the tensor cannot take (6 rows over 4 devices) stops planning, naming the argument.
// CHECK: error: [auto-sharding] CostGraphError: argument b: pinned sharding #sdy.sharding<@mesh, [{"x"}]> splits dimension 0 of size 6 4 ways
func.func public @indivisible(%b: tensor<6xf32> {mw.arg_path = "b", mw.pinned_sharding = #sdy.sharding<@mesh, [{"x"}]>}) -> tensor<6xf32> {
  %0 = stablehlo.tanh %b : tensor<6xf32>
  return %0 : tensor<6xf32>
}
