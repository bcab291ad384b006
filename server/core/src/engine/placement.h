// Where a model's layers live when it is placed over several devices
// (LoadOptions::placement): contiguous layer ranges, one per device, the
// embedding with the first layer, the final norm and an untied head with the
// last. A plan from the explicit text or balanced by bytes; which device
// each tensor goes to. Internal to core.
#ifndef ICD_CORE_SRC_ENGINE_PLACEMENT_H_
#define ICD_CORE_SRC_ENGINE_PLACEMENT_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "icd/core/types.h"
#include "model.h"

namespace icd::engine_internal {

// A model's weight bytes by where a placement puts them.
struct PlacementSizes {
  std::vector<int64_t> layers;  // each layer's tensors
  int64_t first = 0;            // the embedding: with layer 0
  int64_t last = 0;             // the final norm and an untied head: with the last layer
};

// From the config alone (io/config.h's shapes), in `element_bytes` a weight.
PlacementSizes SizesOf(const ModelConfig& config, int64_t element_bytes);

// "cuda:0=0-31,cuda:1=32-63": ranges naming every layer of `n_layer` once,
// in order, each non-empty ("3" is "3-3"). InvalidArgument naming the
// field "placement" and the fault. Devices are taken as written; the engine
// checks that they exist.
absl::StatusOr<std::vector<LayerRange>> ParsePlacement(const std::string& text,
                                                       int64_t n_layer);

// Contiguous ranges over `devices`, in their order, a device left out only
// where that is strictly better (fewer layers than devices, a device with no
// room). Each range's `bytes` is its weights' share. With every device's free bytes known (`capacities`, one
// per device, none 0) the plan fills the fullest device as little as it
// can, and is ResourceExhausted when even that does not fit; otherwise the
// largest device's bytes are as small as they can be.
absl::StatusOr<std::vector<LayerRange>> BalancePlacement(
    const PlacementSizes& sizes, const std::vector<std::string>& devices,
    const std::vector<int64_t>& capacities = {});

// Sets each range's `bytes`: its layers', the embedding's on the first, the
// final norm's and head's on the last.
void CountRangeBytes(const PlacementSizes& sizes, std::vector<LayerRange>* ranges);

// The ranges' bytes summed by device (the memory budget's booking).
std::map<std::string, int64_t> BytesByDevice(const std::vector<LayerRange>& ranges);

// The range whose device holds canonical tensor `name` (model.h's names).
const LayerRange& RangeOfTensor(const std::string& name, const std::vector<LayerRange>& placement);

}  // namespace icd::engine_internal

#endif  // ICD_CORE_SRC_ENGINE_PLACEMENT_H_
