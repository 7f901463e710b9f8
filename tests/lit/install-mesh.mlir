// RUN: meshweave-opt %s --pass-pipeline='install-mesh{shape=2x4}' | FileCheck %s
// RUN: meshweave-opt %s --pass-pipeline='install-mesh' --mesh 8 --mesh-axes dp | FileCheck %s --check-prefix=FLAG
// RUN: expect-exit 1 meshweave-opt %s --pass-pipeline='install-mesh' 2>&1 | FileCheck %s --check-prefix=NOMESH
// RUN: expect-exit 2 meshweave-opt %s --pass-pipeline='install-mesh{shape=2by4}' 2>&1 | FileCheck %s --check-prefix=BAD

// CHECK: module attributes {mhlo.num_partitions = 8 : i32, mhlo.num_replicas = 1 : i32}
// CHECK: sdy.mesh @mesh = <["x"=2, "y"=4]>
// FLAG: sdy.mesh @mesh = <["dp"=8]>
// NOMESH: [install-mesh] no mesh given
// BAD: bad value '2by4' for option 'shape'
module {
  func.func public @main(%x: tensor<8x16xf32>) -> tensor<8x16xf32> {
    return %x : tensor<8x16xf32>
  }
}
