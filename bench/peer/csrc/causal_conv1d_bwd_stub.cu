// Forward-only build of Dao-AILab/causal-conv1d (bench/peer/build_peer.py):
// upstream's causal_conv1d_fwd.cu and causal_conv1d_update.cu are compiled
// unchanged; the backward entry points that causal_conv1d.cpp dispatches to
// are these stubs, which throw if called (inference never calls them).
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "causal_conv1d.h"

template <typename input_t, typename weight_t>
void causal_conv1d_bwd_cuda(ConvParamsBwd &params, cudaStream_t stream);
template <typename input_t, typename weight_t>
void causal_conv1d_channellast_bwd_cuda(ConvParamsBwd &params, cudaStream_t stream);

#define ICD_PEER_CONV_BWD_STUB(I, W)                                                        \
  template <>                                                                               \
  void causal_conv1d_bwd_cuda<I, W>(ConvParamsBwd &, cudaStream_t) {                        \
    TORCH_CHECK(false, "causal_conv1d_cuda (icd bench/peer forward-only build): no backward"); \
  }                                                                                         \
  template <>                                                                               \
  void causal_conv1d_channellast_bwd_cuda<I, W>(ConvParamsBwd &, cudaStream_t) {            \
    TORCH_CHECK(false, "causal_conv1d_cuda (icd bench/peer forward-only build): no backward"); \
  }
ICD_PEER_CONV_BWD_STUB(float, float)
ICD_PEER_CONV_BWD_STUB(at::Half, float)
ICD_PEER_CONV_BWD_STUB(at::BFloat16, float)
ICD_PEER_CONV_BWD_STUB(float, at::Half)
ICD_PEER_CONV_BWD_STUB(at::Half, at::Half)
ICD_PEER_CONV_BWD_STUB(at::BFloat16, at::Half)
ICD_PEER_CONV_BWD_STUB(float, at::BFloat16)
ICD_PEER_CONV_BWD_STUB(at::Half, at::BFloat16)
ICD_PEER_CONV_BWD_STUB(at::BFloat16, at::BFloat16)
