// RUN: meshweave-opt %s --pass-pipeline='strip-markers' | FileCheck %s

// Marker barriers disappear; their users read the marked values directly. A barrier
// without a meshweave marker is left alone.
// CHECK-LABEL: func.func public @main
// CHECK: %[[N:.*]] = stablehlo.negate %arg0
// CHECK-NEXT: %[[B:.*]] = stablehlo.optimization_barrier %[[N]]
// CHECK-NEXT: %[[A:.*]] = stablehlo.add %[[N]], %[[B]]
// CHECK-NOT: mw.marker
module {
  func.func public @main(%x: tensor<4xf32>) -> tensor<4xf32> {
    %0 = stablehlo.negate %x : tensor<4xf32>
    %1 = stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = "grad", mw.name = "grad"}} %0 : tensor<4xf32>
    %2 = stablehlo.optimization_barrier %0 : tensor<4xf32>
    %3 = stablehlo.add %1, %2 : tensor<4xf32>
    return %3 : tensor<4xf32>
  }
}
