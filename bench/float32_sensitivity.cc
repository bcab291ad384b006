// How far a model's float32 logits move from its float64 logits through
// icd's own forward: the amplification a random model applies to rounding.
// A reading of a float32 comparison between implementations (icd, HF,
// mamba_ssm) needs it: differences far above this floor are not rounding.
//
//   float32_sensitivity [--layers 24] [--std 0.1] [--tokens 64]
//
// The model is a random mamba2-130m shape (d_model 768, d_state 128, head
// dim 64, one group), initialised as HF's Mamba2 does (A_log = log(1..H),
// D = 1, dt_bias from dt in [0.001, 0.1], norms 1, projections and embedding
// N(0, std²), conv U(-0.5, 0.5)); prints one JSON line.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "forward/forward.h"
#include "io/config.h"
#include "torch_api.h"

namespace {

torch::Tensor Initial(const std::string& name, const std::vector<int64_t>& shape, double std_dev) {
  const auto f64 = torch::kFloat64;
  if (name.find("A_log") != std::string::npos) {
    return torch::log(torch::arange(1, shape[0] + 1, f64));
  }
  if (name.find(".D") != std::string::npos || name.find("norm") != std::string::npos) {
    return torch::ones(shape, f64);
  }
  if (name.find("dt_bias") != std::string::npos) {
    const double low = std::log(0.001), high = std::log(0.1);
    const torch::Tensor dt = torch::exp(torch::rand(shape, f64) * (high - low) + low);
    return dt + torch::log(-torch::expm1(-dt));  // softplus⁻¹(dt)
  }
  if (name.find("conv1d.weight") != std::string::npos) return torch::rand(shape, f64) - 0.5;
  if (name.find("conv1d.bias") != std::string::npos) return torch::zeros(shape, f64);
  return torch::randn(shape, f64) * std_dev;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t layers = 24, tokens = 64;
  double std_dev = 0.1;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--layers") == 0) layers = std::atol(argv[i + 1]);
    if (std::strcmp(argv[i], "--std") == 0) std_dev = std::atof(argv[i + 1]);
    if (std::strcmp(argv[i], "--tokens") == 0) tokens = std::atol(argv[i + 1]);
  }
  auto config = icd::ParseConfig(
      R"({"model_type": "mamba2", "hidden_size": 768, "num_hidden_layers": )" +
          std::to_string(layers) +
          R"(, "vocab_size": 50280, "state_size": 128, "expand": 2, "head_dim": 64,
          "num_heads": 24, "n_groups": 1, "conv_kernel": 4, "use_bias": false,
          "use_conv_bias": true, "tie_word_embeddings": true})",
      "config");
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", config.status().ToString().c_str());
    return 1;
  }
  torch::manual_seed(0);
  icd::Weights wide, narrow;
  for (const auto& [name, shape] : icd::ExpectedShapes(*config)) {
    wide[name] = Initial(name, shape, std_dev);
    narrow[name] = wide[name].to(torch::kFloat32);
  }
  const torch::Tensor ids = torch::randint(0, config->vocab_size, {1, tokens}, torch::kInt64);
  auto reference = icd::Forward(*config, wide, ids);
  auto rounded = icd::Forward(*config, narrow, ids);
  if (!reference.ok() || !rounded.ok()) {
    std::fprintf(stderr, "forward failed\n");
    return 1;
  }
  const torch::Tensor now = rounded->to(torch::kFloat64);
  const double rel_l2 = ((now - *reference).norm() / reference->norm()).item<double>();
  const double top1 =
      (now.argmax(-1) == reference->argmax(-1)).to(torch::kFloat64).mean().item<double>();
  std::printf("{\"bench\": \"float32_sensitivity\", \"shape\": \"mamba2-130m\", \"layers\": %ld, "
              "\"std\": %g, \"tokens\": %ld, \"rel_l2_float32_vs_float64\": %.3g, "
              "\"top1\": %.4f}\n",
              static_cast<long>(layers), std_dev, static_cast<long>(tokens), rel_l2, top1);
  return 0;
}
