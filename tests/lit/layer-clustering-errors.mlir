// RUN: expect-exit 1 meshweave-opt %s --pass-pipeline='layer-clustering' 2>&1 | FileCheck %s --check-prefix=LOOP

// Error cases of layer-clustering (a failing case stops meshweave-opt, so they live apart).

// A boundary inside a loop body cannot be a pipeline cut: the pass says where to put it.
// LOOP: [layer-clustering] a boundary marker sits inside stablehlo.while (control flow); place mark_pipeline_boundary outside loops and conditionals
module {
  func.func public @marker_in_loop(%x: tensor<f32>) -> tensor<f32> {
    %c = stablehlo.constant dense<0> : tensor<i32>
    %0:2 = stablehlo.while(%i = %c, %v = %x) : tensor<i32>, tensor<f32>
     cond {
      %lim = stablehlo.constant dense<2> : tensor<i32>
      %p = stablehlo.compare LT, %i, %lim : (tensor<i32>, tensor<i32>) -> tensor<i1>
      stablehlo.return %p : tensor<i1>
    } do {
      %m = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "boundary", mw.name = "b0"}} %v : tensor<f32>
      %one = stablehlo.constant dense<1> : tensor<i32>
      %n = stablehlo.add %i, %one : tensor<i32>
      stablehlo.return %n, %m : tensor<i32>, tensor<f32>
    }
    return %0#1 : tensor<f32>
  }
}
