// Forward-only build of state-spaces/mamba's selective_scan extension
// (bench/peer/build_peer.py). Upstream's selective_scan_fwd_{bf16,fp32,fp16}.cu
// each instantiate selective_scan_fwd_cuda<input_t, weight_t> for a real and
// a complex weight type; every instantiation compiles 5 (kNThreads, kNItems)
// configurations x 16 kernel variants in one translation unit, the critical
// path of the build. Here each configuration of selective_scan_fwd_launch is
// its own generated translation unit (build_peer.py: ss_fwd_<dtype>_<T>x<N>.cu,
// which include upstream's selective_scan_fwd_kernel.cuh unchanged), and this
// file holds the same seqlen dispatch as upstream's selective_scan_fwd_cuda
// (its non-ROCm branch, copied), for the input types built (bf16, fp32) with
// real weights. Everything not built -- fp16 and complex forwards, every
// backward -- throws if called: the extension links, and the peer's
// inference path never calls them.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <cuda_runtime.h>

#include "selective_scan.h"

template <int kNThreads, int kNItems, typename input_t, typename weight_t>
void selective_scan_fwd_launch(SSMParamsBase &params, cudaStream_t stream);

template <typename input_t, typename weight_t>
void selective_scan_fwd_cuda(SSMParamsBase &params, cudaStream_t stream) {
  if (params.seqlen <= 128) {
    selective_scan_fwd_launch<32, 4, input_t, weight_t>(params, stream);
  } else if (params.seqlen <= 256) {
    selective_scan_fwd_launch<32, 8, input_t, weight_t>(params, stream);
  } else if (params.seqlen <= 512) {
    selective_scan_fwd_launch<32, 16, input_t, weight_t>(params, stream);
  } else if (params.seqlen <= 1024) {
    selective_scan_fwd_launch<64, 16, input_t, weight_t>(params, stream);
  } else {
    selective_scan_fwd_launch<128, 16, input_t, weight_t>(params, stream);
  }
}

template void selective_scan_fwd_cuda<at::BFloat16, float>(SSMParamsBase &params, cudaStream_t stream);
template void selective_scan_fwd_cuda<float, float>(SSMParamsBase &params, cudaStream_t stream);

#define ICD_PEER_FWD_STUB(I, W)                                                             \
  template <>                                                                               \
  void selective_scan_fwd_cuda<I, W>(SSMParamsBase &, cudaStream_t) {                       \
    TORCH_CHECK(false, "selective_scan_cuda (icd bench/peer forward-only build): the "      \
                       "forward for input " #I ", weight " #W " was not built");            \
  }
ICD_PEER_FWD_STUB(at::Half, float)
ICD_PEER_FWD_STUB(at::Half, c10::complex<float>)
ICD_PEER_FWD_STUB(at::BFloat16, c10::complex<float>)
ICD_PEER_FWD_STUB(float, c10::complex<float>)

template <typename input_t, typename weight_t>
void selective_scan_bwd_cuda(SSMParamsBwd &params, cudaStream_t stream);

#define ICD_PEER_BWD_STUB(I, W)                                                             \
  template <>                                                                               \
  void selective_scan_bwd_cuda<I, W>(SSMParamsBwd &, cudaStream_t) {                        \
    TORCH_CHECK(false, "selective_scan_cuda (icd bench/peer forward-only build): no "       \
                       "backward");                                                         \
  }
ICD_PEER_BWD_STUB(float, float)
ICD_PEER_BWD_STUB(float, c10::complex<float>)
ICD_PEER_BWD_STUB(at::Half, float)
ICD_PEER_BWD_STUB(at::Half, c10::complex<float>)
ICD_PEER_BWD_STUB(at::BFloat16, float)
ICD_PEER_BWD_STUB(at::BFloat16, c10::complex<float>)
