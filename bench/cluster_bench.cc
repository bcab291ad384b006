// Times icd's modularity clustering on a dense graph and prints one JSON
// line: nodes, graph kind, seconds, modularity, clusters, device.
//
//   cluster_bench --nodes 4096 --graph planted|noise [--seed S]
//                 [--device cpu|cuda] [--resolution R] [--save graph.npy]
//                 [--save-labels labels.txt]
//   cluster_bench --load graph.npy ...
//
// planted: communities of 64 nodes, weights U(0.5, 1) inside and U(0, 0.4)
// across; noise: U(0, 1) everywhere. Both symmetric with a zero diagonal.
// --save writes the graph (float64 .npy) for a reference solver (igraph);
// --save-labels the partition, one label per line.
#include "torch_api.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>

#include "icd/core/host_memory.h"
#include "traces/graph.h"
#include "traces/leiden.h"
#include "traces/stats.h"

namespace {

using icd::traces::UniformKeys;

torch::Tensor MakeGraph(const std::string& kind, int64_t nodes, uint64_t seed) {
  const torch::Tensor noise = UniformKeys(nodes, nodes, seed);
  torch::Tensor graph;
  if (kind == "planted") {
    const torch::Tensor shuffle = UniformKeys(1, nodes, seed + 1).argsort(int64_t{1}).squeeze(0);
    const torch::Tensor label = torch::div(shuffle, 64, "floor");
    const torch::Tensor same = label.unsqueeze(1) == label.unsqueeze(0);
    graph = torch::where(same, 0.5 + 0.5 * noise, 0.4 * noise);
  } else if (kind == "noise") {
    graph = noise;
  } else {
    throw std::runtime_error("--graph must be planted or noise");
  }
  graph = (graph + graph.t()) / 2;
  graph.fill_diagonal_(0);
  return graph;
}

// NumPy .npy v1.0, little-endian float64, C order.
void SaveNpy(const torch::Tensor& graph, const std::string& path) {
  std::string header = "{'descr': '<f8', 'fortran_order': False, 'shape': (" +
                       std::to_string(graph.size(0)) + ", " + std::to_string(graph.size(1)) +
                       "), }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  const auto length = static_cast<uint16_t>(header.size());
  out.put(static_cast<char>(length & 0xff)).put(static_cast<char>(length >> 8));
  out << header;
  const torch::Tensor host = graph.to(torch::kCPU, torch::kFloat64).contiguous();
  out.write(reinterpret_cast<const char*>(host.data_ptr<double>()),
            static_cast<std::streamsize>(host.numel() * 8));
}

torch::Tensor LoadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[10];
  in.read(magic, 10);
  if (std::memcmp(magic, "\x93NUMPY\x01\x00", 8) != 0) throw std::runtime_error("not a .npy v1");
  const int length = static_cast<unsigned char>(magic[8]) | (static_cast<unsigned char>(magic[9]) << 8);
  std::string header(static_cast<size_t>(length), ' ');
  in.read(header.data(), length);
  if (header.find("'<f8'") == std::string::npos || header.find("False") == std::string::npos) {
    throw std::runtime_error("need a C-order float64 .npy");
  }
  const auto open = header.find('('), comma = header.find(',', open);
  const int64_t nodes = std::stoll(header.substr(open + 1, comma - open - 1));
  torch::Tensor graph = torch::empty({nodes, nodes}, torch::kFloat64);
  in.read(reinterpret_cast<char*>(graph.data_ptr<double>()), static_cast<std::streamsize>(graph.numel() * 8));
  if (!in) throw std::runtime_error("truncated .npy");
  return graph;
}

}  // namespace

int main(int argc, char** argv) {
  icd::KeepFreedHostMemory();  // as icd-server does
  int64_t nodes = 1024;
  std::string kind = "planted", device = "cpu", save, load, save_labels;
  uint64_t seed = 1;
  double resolution = 1.0;
  int restarts = icd::traces::LeidenOptions{}.restarts;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--nodes") nodes = std::stoll(value());
    else if (flag == "--graph") kind = value();
    else if (flag == "--seed") seed = std::stoull(value());
    else if (flag == "--device") device = value();
    else if (flag == "--resolution") resolution = std::stod(value());
    else if (flag == "--restarts") restarts = std::stoi(value());
    else if (flag == "--save") save = value();
    else if (flag == "--load") load = value();
    else if (flag == "--save-labels") save_labels = value();
    else {
      std::cerr << "usage: cluster_bench --nodes N --graph planted|noise [--seed S] [--device D]"
                   " [--resolution R] [--restarts K] [--save F.npy] | --load F.npy\n";
      return 2;
    }
  }
  torch::Tensor graph = load.empty() ? MakeGraph(kind, nodes, seed) : LoadNpy(load);
  if (!load.empty()) kind = load;
  if (!save.empty()) SaveNpy(graph, save);
  graph = graph.to(torch::Device(device));
  const auto start = std::chrono::steady_clock::now();
  icd::traces::LeidenOptions options;
  options.resolution = resolution;
  options.seed = seed;
  options.restarts = restarts;
  auto labels = icd::traces::LeidenCluster(graph, options);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!labels.ok()) {
    std::cerr << labels.status() << "\n";
    return 1;
  }
  int64_t clusters = 0;
  for (int64_t label : *labels) clusters = std::max(clusters, label + 1);
  if (!save_labels.empty()) {
    std::ofstream out(save_labels);
    for (int64_t label : *labels) out << label << "\n";
  }
  std::printf(
      "{\"nodes\": %lld, \"graph\": \"%s\", \"seed\": %llu, \"device\": \"%s\", \"threads\": %d, "
      "\"seconds\": %.4f, \"modularity\": %.10f, \"clusters\": %lld}\n",
      static_cast<long long>(graph.size(0)), kind.c_str(), static_cast<unsigned long long>(seed),
      device.c_str(), torch::get_num_threads(), seconds,
      icd::traces::Modularity(graph, *labels, resolution), static_cast<long long>(clusters));
  return 0;
}
