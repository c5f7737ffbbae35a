// The element type of a kernel's floating-point tensors, for the CUDA kernels of every op: plain
// C++, no torch (the .cu files include it). csrc/include/loca_kernels/torch_checks.h maps a
// torch dtype to it.
#pragma once

namespace loca_kernels {

enum class Dtype { kFloat32, kFloat16, kBFloat16 };

}  // namespace loca_kernels
