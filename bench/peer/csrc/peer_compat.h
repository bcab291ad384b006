// Force-included (-include) into the peers' .cpp bindings by build_peer.py:
// AT_ERROR is a deprecated alias that a future LibTorch may drop; the peers'
// dispatch macros still use it.
#pragma once
#include <c10/util/Exception.h>
#ifndef AT_ERROR
#define AT_ERROR(...) TORCH_CHECK(false, __VA_ARGS__)
#endif
