// RUN: meshweave-opt %s --pass-pipeline='cse,canonicalize' | FileCheck %s
// RUN: expect-exit 2 meshweave-opt %s --pass-pipeline='cse,no-such-pass' 2>&1 | FileCheck %s --check-prefix=UNKNOWN

// Upstream MLIR passes run in the same pipeline as meshweave's: cse merges the two negates.
// CHECK: %[[N:.*]] = stablehlo.negate %arg0
// CHECK-NOT: stablehlo.negate
// CHECK: stablehlo.add %[[N]], %[[N]]
// UNKNOWN: unknown pass 'no-such-pass'
module {
  func.func public @main(%x: tensor<4xf32>) -> tensor<4xf32> {
    %0 = stablehlo.negate %x : tensor<4xf32>
    %1 = stablehlo.negate %x : tensor<4xf32>
    %2 = stablehlo.add %0, %1 : tensor<4xf32>
    return %2 : tensor<4xf32>
  }
}
