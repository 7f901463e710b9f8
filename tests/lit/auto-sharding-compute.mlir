// RUN: meshweave-opt %s --split-input-file --pass-pipeline='install-mesh{shape=2x4},auto-sharding{alpha=1000,1000}' | FileCheck %s --check-prefix=FREE
// RUN: meshweave-opt %s --split-input-file --pass-pipeline='install-mesh{shape=2x4},auto-sharding{alpha=1000,1000 device-flops=1e4}' | FileCheck %s --check-prefix=PRICED
// RUN: expect-exit 1 meshweave-opt %s --split-input-file --pass-pipeline='install-mesh{shape=2x4},auto-sharding{device-flops=-1}' 2>&1 | FileCheck %s --check-prefix=BADRATE

// A dot whose batch (1028 = 4 x 257) splits 4 ways but not 8 and whose other dims (255) do not
// split: no strategy uses the whole mesh. Splitting the batch costs an all-reduce of the sum
// (alpha 1000); without compute in the objective the replicated dot looks free and is kept.
// FREE-LABEL: func.func public @batch_dot
// FREE:         stablehlo.dot_general
// FREE-SAME:      mw.strategy = "[-,-] x [-,-] -> [-,-]"
// With 1e4 FLOP per time unit, the whole dot (1.3e8 FLOPs) costs 13400 on each device and a
// quarter of it 3350: the batch is split over y and the all-reduce paid.
// PRICED-LABEL: func.func public @batch_dot
// PRICED-SAME:    %arg1: tensor<1028x255xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64, sdy.sharding = #sdy.sharding<@mesh, [{"y"}, {}]>}
// PRICED:         stablehlo.dot_general
// PRICED-SAME:      mw.strategy = "[y,-] x [-,-] -> [y,-]"
// BADRATE: error: [auto-sharding] device-flops=-1.0: expected a positive FLOP/s rate, or 0 to leave compute out of the objective
func.func public @batch_dot(%w: tensor<255x255xf32> {mw.arg_path = "w"},
                            %x: tensor<1028x255xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64}) -> tensor<f32> {
  %0 = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0] : (tensor<1028x255xf32>, tensor<255x255xf32>) -> tensor<1028x255xf32>
  %1 = stablehlo.tanh %0 : tensor<1028x255xf32>
  %c = stablehlo.constant dense<0.0> : tensor<f32>
  %2 = stablehlo.reduce(%1 init: %c) applies stablehlo.add across dimensions = [0, 1] : (tensor<1028x255xf32>, tensor<f32>) -> tensor<f32>
  return %2 : tensor<f32>
}

// -----

// A dot the whole mesh splits (batch 1024 over x and y): priced or not, it uses every device;
// compute is the same for each such strategy, so the plan is the communication-only one.
// FREE-LABEL: func.func public @full_split
// FREE:         stablehlo.dot_general
// FREE-SAME:      mw.strategy = "[xy,-] x [-,-] -> [xy,-]"
// PRICED-LABEL: func.func public @full_split
// PRICED:         stablehlo.dot_general
// PRICED-SAME:      mw.strategy = "[xy,-] x [-,-] -> [xy,-]"
func.func public @full_split(%w: tensor<255x255xf32> {mw.arg_path = "w"},
                             %x: tensor<1024x255xf32> {mw.arg_path = "x", mw.batch_dim = 0 : i64}) -> tensor<f32> {
  %0 = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0] : (tensor<1024x255xf32>, tensor<255x255xf32>) -> tensor<1024x255xf32>
  %1 = stablehlo.tanh %0 : tensor<1024x255xf32>
  %c = stablehlo.constant dense<0.0> : tensor<f32>
  %2 = stablehlo.reduce(%1 init: %c) applies stablehlo.add across dimensions = [0, 1] : (tensor<1024x255xf32>, tensor<f32>) -> tensor<f32>
  return %2 : tensor<f32>
}
