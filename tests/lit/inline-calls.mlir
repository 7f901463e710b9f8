// RUN: meshweave-opt %s --pass-pipeline='inline-calls' | FileCheck %s

// The private @relu is inlined into @main and deleted; nested calls are inlined too.
// CHECK-LABEL: func.func public @main
// CHECK-NOT: call
// CHECK: %[[DOT:.*]] = stablehlo.dot_general
// CHECK: %[[MAX:.*]] = stablehlo.maximum %[[DOT]]
// CHECK: stablehlo.negate %[[MAX]]
// CHECK-NOT: func.func private
module {
  func.func public @main(%x: tensor<8x16xf32>, %w: tensor<16x4xf32>) -> tensor<8x4xf32> {
    %0 = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0] : (tensor<8x16xf32>, tensor<16x4xf32>) -> tensor<8x4xf32>
    %1 = call @outer(%0) : (tensor<8x4xf32>) -> tensor<8x4xf32>
    return %1 : tensor<8x4xf32>
  }
  func.func private @outer(%a: tensor<8x4xf32>) -> tensor<8x4xf32> {
    %0 = call @relu(%a) : (tensor<8x4xf32>) -> tensor<8x4xf32>
    %1 = stablehlo.negate %0 : tensor<8x4xf32>
    return %1 : tensor<8x4xf32>
  }
  func.func private @relu(%a: tensor<8x4xf32>) -> tensor<8x4xf32> {
    %cst = stablehlo.constant dense<0.0> : tensor<8x4xf32>
    %0 = stablehlo.maximum %a, %cst : tensor<8x4xf32>
    return %0 : tensor<8x4xf32>
  }
}
