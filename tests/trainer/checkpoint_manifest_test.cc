// ParseCheckpointManifest on malformed manifests: DATA_LOSS naming the
// problem, never an exception or a silently wrapped number. The inputs are
// what checkpoint_manifest_fuzzer found crashing or misreading.
#include "worker/trainer/checkpoint_manifest.h"

#include <gtest/gtest.h>

#include <string>

namespace ftune::trainer {
namespace {

std::string Manifest(const std::string& replace_key, const std::string& value) {
  std::string fields[][2] = {
      {"format", "\"ftune-checkpoint\""}, {"version", "1"}, {"step", "20"},
      {"micro_batches", "80"}, {"tokens_total", "4096"}, {"loss", "1.5"},
      {"world_size", "1"}, {"total_numel", "8"}, {"seed", "42"},
      {"shards", "[{\"file\": \"shard-0-of-1.safetensors\", \"bytes\": 100}]"},
      {"layout", "[{\"name\": \"a\", \"offset\": 0, \"numel\": 8, \"shape\": [2, 4]}]"}};
  std::string out = "{";
  for (auto& f : fields) {
    if (out.size() > 1) out += ", ";
    out += "\"" + f[0] + "\": " + (f[0] == replace_key ? value : f[1]);
  }
  return out + "}";
}

TEST(CheckpointManifestTest, ParsesWhatTheWriterWrites) {
  auto s = ParseCheckpointManifest(Manifest("", ""), "m.json");
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->step, 20);
  EXPECT_EQ(s->world_size, 1);
  EXPECT_EQ(s->seed, 42u);
  ASSERT_EQ(s->layout.size(), 1u);
  EXPECT_EQ(s->layout[0].shape, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(s->shard_bytes, (std::vector<int64_t>{100}));
}

TEST(CheckpointManifestTest, MalformedIsDataLossNotACrash) {
  const std::pair<std::string, std::string> cases[] = {
      {"format", "7"},                // threw out of the parser (std::terminate)
      {"version", "1e300"},           // float to int: undefined behaviour
      {"world_size", "4294967297"},   // wrapped to 1
      {"step", "-1"},
      {"seed", "-1"},
      {"shards", "\"a\""},            // a string's size() is 1
      {"layout", "[{\"name\": \"a\", \"offset\": 0.5, \"numel\": 1, \"shape\": [1]}]"},
      {"loss", "\"x\""}};
  for (const auto& [key, value] : cases) {
    auto s = ParseCheckpointManifest(Manifest(key, value), "m.json");
    ASSERT_FALSE(s.ok()) << key << "=" << value;
    EXPECT_EQ(s.status().code(), StatusCode::kDataLoss) << key;
    EXPECT_NE(s.status().message().find("m.json"), std::string::npos) << s.status().message();
  }
}

}  // namespace
}  // namespace ftune::trainer
