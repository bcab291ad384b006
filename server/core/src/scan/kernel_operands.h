// The LibTorch side's view of a kernel operand (CUDA builds: *_cuda.cc): the
// element type a kernel reads a dtype as, and a [B, L, ...] tensor as raw
// pointer and strides (selective_scan_launch.h).
#ifndef ICD_CORE_SRC_SCAN_KERNEL_OPERANDS_H_
#define ICD_CORE_SRC_SCAN_KERNEL_OPERANDS_H_

#include <optional>

#include "scan/selective_scan_launch.h"
#include "torch_api.h"

namespace icd::scan {

// float32, bfloat16 and float16; nullopt for the rest (float64: the
// LibTorch paths).
inline std::optional<ScanElementType> KernelElementType(torch::ScalarType type) {
  switch (type) {
    case torch::kFloat32:
      return ScanElementType::kFloat32;
    case torch::kBFloat16:
      return ScanElementType::kBFloat16;
    case torch::kFloat16:
      return ScanElementType::kFloat16;
    default:
      return std::nullopt;
  }
}

// Data pointer and the batch and time strides (axes 0 and 1), in elements.
inline ScanOperand Operand(const torch::Tensor& tensor) {
  ScanOperand operand;
  operand.data = tensor.data_ptr();
  operand.batch_stride = tensor.stride(0);
  operand.time_stride = tensor.stride(1);
  return operand;
}

// A parameter's pointer and whether it is float32 (else the compute dtype);
// null for an undefined tensor.
inline ParameterOperand Parameter(const torch::Tensor& tensor) {
  ParameterOperand operand;
  if (!tensor.defined()) return operand;
  operand.data = tensor.data_ptr();
  operand.wide = tensor.scalar_type() == torch::kFloat32;
  return operand;
}

}  // namespace icd::scan

#endif  // ICD_CORE_SRC_SCAN_KERNEL_OPERANDS_H_
