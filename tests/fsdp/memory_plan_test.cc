// PlanMemory: hand-computed shard sizes, the structural effects of each
// option, and the Llama-3-70B figures for the issue's three fleets (printed;
// GPU validation of the constants comes later).
#include "worker/modelio/memory_plan.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <string>

namespace ftune::trainer {
namespace {

constexpr int64_t kGiB = 1LL << 30;

LlamaConfig Llama3_70B() {
  LlamaConfig c;
  c.hidden_size = 8192;
  c.intermediate_size = 28672;
  c.num_hidden_layers = 80;
  c.num_attention_heads = 64;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.vocab_size = 128256;
  c.tie_word_embeddings = false;
  return c;
}

MemoryPlanOptions Fleet(int world, bool offload) {
  MemoryPlanOptions o;
  o.world_size = world;
  o.micro_batch_size = 1;
  o.seq_len = 2048;
  o.lora_r = 16;
  o.offload_params = offload;
  return o;
}

TEST(MemoryPlanTest, Nf4ShardBytesFollowsThe256BlockSplit) {
  // 769 blocks of 64 over 2 ranks: 385 -> 512 blocks per rank (256-aligned).
  const int64_t n = 64 * 256 * 3 + 10;
  EXPECT_EQ(Nf4ShardBytes(n, 64, true, 2), 512 * 32 + 512 + 2 * 4);
  // Not nested: 385 blocks per rank, fp32 absmax.
  EXPECT_EQ(Nf4ShardBytes(n, 64, false, 2), 385 * 32 + 385 * 4);
  // One rank: the whole tensor's storage rounded to whole nested blocks.
  EXPECT_EQ(Nf4ShardBytes(n, 64, true, 1), 1024 * 32 + 1024 + 4 * 4);
  // More ranks than nested blocks: every rank still holds one padded piece.
  EXPECT_EQ(Nf4ShardBytes(64 * 10, 64, true, 4), 256 * 32 + 256 + 4);
}

int64_t Item(const MemoryPlan& plan, const std::string& name) {
  for (const auto& [n, bytes] : plan.device_items) {
    if (n == name) return bytes;
  }
  ADD_FAILURE() << "no device item '" << name << "'";
  return 0;
}

TEST(MemoryPlanTest, QwenBiasesAndTiedEmbeddingsAreCounted) {
  // Qwen2.5 0.5B's shape (config.json on the Hub).
  LlamaConfig c;
  c.family = ModelFamily::kQwen2;
  c.hidden_size = 896;
  c.intermediate_size = 4864;
  c.num_hidden_layers = 24;
  c.num_attention_heads = 14;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.vocab_size = 151936;
  c.tie_word_embeddings = true;
  c.qkv_bias = true;
  MemoryPlanOptions o = Fleet(2, false);
  o.compute_dtype_bytes = 2;
  auto with = PlanMemory(c, o);
  ASSERT_TRUE(with.ok());
  LlamaConfig no_bias = c;
  no_bias.qkv_bias = false;
  auto without = PlanMemory(no_bias, o);
  ASSERT_TRUE(without.ok());
  // Per layer: q (896) + k, v (128 each) bias elements, split over 2 ranks.
  EXPECT_EQ(Item(*with, "frozen shards") - Item(*without, "frozen shards"),
            24 * (448 + 64 + 64) * 2);
  LlamaConfig untied = c;
  untied.tie_word_embeddings = false;
  auto u = PlanMemory(untied, o);
  ASSERT_TRUE(u.ok());
  // An untied lm_head is a second (vocab x hidden) shard.
  EXPECT_EQ(Item(*u, "frozen shards") - Item(*with, "frozen shards"), 151936 * 896 / 2 * 2);
}

TEST(MemoryPlanTest, OneRankGathersNothing) {
  // With one rank a unit's gathered layout is its shard (fsdp.h): the plan
  // adds no gathered copy of a layer or of the head on top of the shards.
  auto one = PlanMemory(Llama3_70B(), Fleet(1, false));
  ASSERT_TRUE(one.ok());
  for (const auto& [name, bytes] : one->device_items) {
    if (name.find("gathered") != std::string::npos) {
      EXPECT_EQ(bytes, 0) << name;
    }
  }
  // Two ranks do pay for a gathered layer (and its staging) beyond the shards.
  auto two = PlanMemory(Llama3_70B(), Fleet(2, false));
  ASSERT_TRUE(two.ok());
  int64_t gathered = 0;
  for (const auto& [name, bytes] : two->device_items) {
    if (name.find("gathered") != std::string::npos) gathered += bytes;
  }
  EXPECT_GT(gathered, 0);
}

TEST(MemoryPlanTest, RejectsBadOptionsNamingTheField) {
  MemoryPlanOptions o;
  o.world_size = 0;
  auto p = PlanMemory(Llama3_70B(), o);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("world_size (0)"), std::string::npos);
  o = MemoryPlanOptions();
  o.target_modules = {"qkv"};
  p = PlanMemory(Llama3_70B(), o);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("'qkv'"), std::string::npos);
}

TEST(MemoryPlanTest, Llama70BFrozenBytesAndLoraCount) {
  auto one = PlanMemory(Llama3_70B(), Fleet(1, false));
  ASSERT_TRUE(one.ok()) << one.status().ToString();
  // 80 layers x (4 * 8192^2 / 4 (GQA k,v: 1024 rows) ...) computed by hand:
  // projections 80 * (8192*8192*2 + 1024*8192*2 + 28672*8192*3) elements.
  const double proj = 80.0 * (8192.0 * 8192 * 2 + 1024.0 * 8192 * 2 + 28672.0 * 8192 * 3);
  const double dense = 2.0 * 128256 * 8192 + 80.0 * 2 * 8192 + 8192;  // embed, lm_head, norms
  // NF4 with double quant: 4.127 bits per parameter (plus < 256 blocks of
  // padding per tensor), dense in bf16.
  const double want = proj * (0.5 + 1.0 / 64 + 4.0 / (64 * 256)) + dense * 2;
  EXPECT_NEAR(static_cast<double>(one->frozen_shard_bytes), want, want * 1e-3);
  // r = 16 on all 7 projections: 80 * 16 * sum(in + out).
  const int64_t per_layer = 16 * ((8192 + 8192) * 2 + (8192 + 1024) * 2 + (8192 + 28672) * 3);
  EXPECT_EQ(one->lora_params, 80 * per_layer);

  auto two = PlanMemory(Llama3_70B(), Fleet(2, false));
  ASSERT_TRUE(two.ok());
  EXPECT_NEAR(static_cast<double>(two->frozen_shard_bytes),
              static_cast<double>(one->frozen_shard_bytes) / 2, want * 2e-3);
}

TEST(MemoryPlanTest, OptionsMoveMemoryWhereTheyShould) {
  const LlamaConfig c = Llama3_70B();
  auto base = PlanMemory(c, Fleet(2, false)).value();
  auto off = PlanMemory(c, Fleet(2, true)).value();
  // Offload moves the frozen shards (and the LoRA shard + AdamW state) to the host.
  EXPECT_LT(off.device_peak_bytes, base.device_peak_bytes - base.frozen_shard_bytes * 9 / 10);
  EXPECT_GT(off.host_peak_bytes, base.host_peak_bytes + base.frozen_shard_bytes * 9 / 10);
  // SHARD_GRAD_OP keeps every layer gathered: the whole model on each rank.
  MemoryPlanOptions o = Fleet(2, false);
  o.reshard_after_forward = false;
  auto sgo = PlanMemory(c, o).value();
  EXPECT_GT(sgo.device_peak_bytes, base.device_peak_bytes + base.frozen_shard_bytes * 8 / 10);
  // No checkpointing: 80 layers' activations instead of one.
  o = Fleet(2, false);
  o.activation_checkpointing = false;
  auto nock = PlanMemory(c, o).value();
  EXPECT_GT(nock.device_peak_bytes, base.device_peak_bytes + 10 * kGiB);
  // Longer sequences cost more; more ranks less.
  o = Fleet(2, false);
  o.seq_len = 4096;
  EXPECT_GT(PlanMemory(c, o).value().device_peak_bytes, base.device_peak_bytes);
  EXPECT_LT(PlanMemory(c, Fleet(4, false)).value().device_peak_bytes, base.device_peak_bytes);
}

LlamaConfig Llama3_8B() {
  LlamaConfig c = Llama3_70B();
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  return c;
}

// Checkpointing k of L layers sits between all and none, one layer's
// activations (minus its input) per layer not checkpointed.
TEST(MemoryPlanTest, PartialCheckpointingIsBetweenAllAndNone) {
  const LlamaConfig c = Llama3_8B();
  MemoryPlanOptions o = Fleet(1, false);
  auto peak = [&](int64_t layers) {
    o.checkpoint_layers = layers;
    return PlanMemory(c, o).value().device_peak_bytes;
  };
  const int64_t all = peak(-1);
  EXPECT_EQ(peak(32), all);
  EXPECT_EQ(peak(100), all);
  int64_t prev = all;
  for (int64_t k = 31; k >= 0; --k) {
    const int64_t p = peak(k);
    EXPECT_GT(p, prev) << k << " checkpointed layers";
    prev = p;
  }
  o.checkpoint_layers = -1;
  o.activation_checkpointing = false;
  EXPECT_EQ(PlanMemory(c, o).value().device_peak_bytes, prev);
  // Each layer kept costs the same: the steps are equal.
  o.activation_checkpointing = true;
  EXPECT_NEAR(static_cast<double>(peak(30) - peak(31)), static_cast<double>(peak(20) - peak(21)), 16);
}

// The fused kernels keep, per layer not checkpointed, bf16 norm inputs
// instead of fp32 copies (2 norms x 2 bytes x T x h) and no silu(gate)
// (2 bytes x T x intermediate); the op chains on the 16-bit path otherwise.
TEST(MemoryPlanTest, FusedKernelsKeepLessPerLayer) {
  const LlamaConfig c = Llama3_8B();
  MemoryPlanOptions o = Fleet(1, false);
  o.activation_checkpointing = false;
  const int64_t T = o.micro_batch_size * o.seq_len;
  auto peak = [&](bool fused) {
    o.fused_kernels = fused;
    return PlanMemory(c, o).value().device_peak_bytes;
  };
  // Every layer's saved activations, and the layer whose backward runs.
  const double saved = static_cast<double>(peak(false) - peak(true));
  const double per_layer = (2.0 * 2 * T * c.hidden_size + 2.0 * T * c.intermediate_size);
  EXPECT_GE(saved, per_layer * c.num_hidden_layers * 0.99);
  EXPECT_LE(saved, per_layer * (c.num_hidden_layers + 1) * (1.0 + o.activation_grad_factor) * 1.01);
}

TEST(MemoryPlanTest, ChooseCheckpointLayersTakesTheLeastRecomputeThatFits) {
  const LlamaConfig c = Llama3_8B();
  const MemoryPlanOptions o = Fleet(1, false);
  // A device that holds every activation: nothing is recomputed.
  auto big = ChooseCheckpointLayers(c, o, 200 * kGiB, /*allocator_budget=*/false).value();
  EXPECT_TRUE(big.fits);
  EXPECT_EQ(big.checkpoint_layers, 0);
  EXPECT_EQ(big.recompute_keep, RecomputeKeep::kNothing);
  EXPECT_EQ(big.dequantized_kept_layers, 32);  // and every layer keeps its weights
  // Too small for even full checkpointing: all layers, keeping nothing,
  // reported as not fitting.
  auto tiny = ChooseCheckpointLayers(c, o, 2 * kGiB, false).value();
  EXPECT_FALSE(tiny.fits);
  EXPECT_EQ(tiny.checkpoint_layers, 32);
  EXPECT_EQ(tiny.recompute_keep, RecomputeKeep::kNothing);
  EXPECT_EQ(tiny.dequantized_kept_layers, 0);
  // In between: the choice fits within 90%, and every choice with less
  // estimated work (recompute less the dequantizations saved) does not.
  const auto work = [&](int64_t n, RecomputeKeep keep, int64_t dense) {
    return RecomputeCost(c, o, n, keep) - DequantizeSaving(c, o, dense);
  };
  for (int64_t gib : {10, 12, 14, 18, 24, 28}) {
    SCOPED_TRACE(gib);
    const double limit = 0.9 * static_cast<double>(gib * kGiB);
    auto mid = ChooseCheckpointLayers(c, o, gib * kGiB, false).value();
    ASSERT_TRUE(mid.fits);
    EXPECT_LE(mid.plan.device_peak_bytes, limit);
    EXPECT_LE(mid.dequantized_kept_layers, 32 - mid.checkpoint_layers);
    const double cost = work(mid.checkpoint_layers, mid.recompute_keep, mid.dequantized_kept_layers);
    int64_t alternatives = 0;
    for (int64_t n = 0; n <= 32; ++n) {
      for (RecomputeKeep keep : {RecomputeKeep::kNothing, RecomputeKeep::kDownProj,
                                 RecomputeKeep::kAllProjections}) {
        for (int64_t dense = 0; dense <= 32 - n; ++dense) {
          if (work(n, keep, dense) >= cost) continue;
          MemoryPlanOptions other = o;
          other.checkpoint_layers = n;
          other.recompute_keep = keep;
          other.dequantized_kept_layers = dense;
          EXPECT_GT(PlanMemory(c, other).value().device_peak_bytes, limit)
              << n << " layers keeping " << RecomputeKeepName(keep) << ", " << dense
              << " keeping dequantized weights fit with less work";
          ++alternatives;
        }
      }
    }
    EXPECT_GT(alternatives, 0);
    std::printf("8B seq 2048 on %lld GiB: %lld of 32 layers checkpointed keeping %s, "
                "%lld keeping dequantized weights, plan %.2f GiB, recompute %.0f%% of full\n",
                static_cast<long long>(gib), static_cast<long long>(mid.checkpoint_layers),
                RecomputeKeepName(mid.recompute_keep),
                static_cast<long long>(mid.dequantized_kept_layers),
                static_cast<double>(mid.plan.device_peak_bytes) / kGiB,
                100.0 * RecomputeCost(c, o, mid.checkpoint_layers, mid.recompute_keep) /
                    RecomputeCost(c, o, 32, RecomputeKeep::kNothing));
  }
  // An allocator cap does not count the CUDA context against the budget.
  auto capped = ChooseCheckpointLayers(c, o, 16 * kGiB, /*allocator_budget=*/true).value();
  auto device = ChooseCheckpointLayers(c, o, 16 * kGiB, false).value();
  EXPECT_LE(RecomputeCost(c, o, capped.checkpoint_layers, capped.recompute_keep),
            RecomputeCost(c, o, device.checkpoint_layers, device.recompute_keep));
  EXPECT_FALSE(ChooseCheckpointLayers(c, o, 0, false).ok());
  // Dense bases keep nothing: only NF4 GEMMs take part.
  MemoryPlanOptions dense = o;
  dense.quantize_base = false;
  for (int64_t gib : {12, 20, 30}) {
    auto d = ChooseCheckpointLayers(c, dense, gib * kGiB, false).value();
    EXPECT_EQ(d.recompute_keep, RecomputeKeep::kNothing) << gib;
    EXPECT_EQ(d.dequantized_kept_layers, 0) << gib;
  }
}

// Layers not checkpointed that keep their dequantized weights count them:
// the projections in the compute dtype, with the adapters' A rows of the
// fused q/k/v and gate/up buffers; never more layers than are not
// checkpointed, and none with dense bases.
TEST(MemoryPlanTest, DequantizedWeightsKeptAreCountedPerLayerNotCheckpointed) {
  const LlamaConfig c = Llama3_8B();
  MemoryPlanOptions o = Fleet(1, false);
  const int64_t h = c.hidden_size, r = o.lora_r, inter = c.intermediate_size;
  auto kept = [&](bool checkpointing, int64_t checkpointed, int64_t dense) -> int64_t {
    o.activation_checkpointing = checkpointing;
    o.checkpoint_layers = checkpointed;
    o.dequantized_kept_layers = dense;
    const MemoryPlan p = PlanMemory(c, o).value();
    for (const auto& [name, bytes] : p.device_items) {
      if (name == "dequantized weights kept for backward") return bytes;
    }
    return 0;
  };
  const int64_t weights = h * (c.q_size() + 2 * c.kv_size()) + c.q_size() * h + 3 * inter * h;
  const int64_t per_layer = (weights + 5 * r * h) * 2;  // A rows of q, k, v, gate, up
  EXPECT_EQ(kept(false, -1, 0), 0);
  EXPECT_EQ(kept(false, -1, 1), per_layer);
  EXPECT_EQ(kept(false, -1, 32), 32 * per_layer);
  EXPECT_EQ(kept(false, -1, 40), 32 * per_layer);
  EXPECT_EQ(kept(true, 30, 8), 2 * per_layer);   // only the 2 layers not checkpointed
  EXPECT_EQ(kept(true, -1, 8), 0);
  // The peak moves by as much (plus the allocator's share).
  const int64_t none = [&] { kept(false, -1, 0); return PlanMemory(c, o).value().device_peak_bytes; }();
  const int64_t all = [&] { kept(false, -1, 32); return PlanMemory(c, o).value().device_peak_bytes; }();
  EXPECT_GE(all - none, 32 * per_layer);
  EXPECT_LE(all - none, static_cast<int64_t>(32 * per_layer * 1.05));
  o.quantize_base = false;
  EXPECT_EQ(kept(false, -1, 32), 0);
  o.quantize_base = true;
  o.dequantized_kept_layers = -1;
  EXPECT_FALSE(o.Validate().ok());
}

TEST(MemoryPlanTest, DequantizeSavingIsOnePassOfTheKeptLayersWeights) {
  const LlamaConfig c = Llama3_8B();
  MemoryPlanOptions o = Fleet(1, false);
  EXPECT_EQ(DequantizeSaving(c, o, 0), 0);
  const double layer_weights = 4096.0 * (4096 + 2 * 1024 + 4096 + 3 * 14336);
  EXPECT_DOUBLE_EQ(DequantizeSaving(c, o, 1), kDequantizeFlopsPerWeight * layer_weights);
  EXPECT_DOUBLE_EQ(DequantizeSaving(c, o, 32), 32 * DequantizeSaving(c, o, 1));
  EXPECT_DOUBLE_EQ(DequantizeSaving(c, o, 99), DequantizeSaving(c, o, 32));
  // Worth less than not recomputing a layer, so memory goes to activations
  // first.
  EXPECT_LT(DequantizeSaving(c, o, 1), RecomputeCost(c, o, 1, RecomputeKeep::kNothing));
  o.quantize_base = false;
  EXPECT_EQ(DequantizeSaving(c, o, 32), 0);
}

// What each checkpointed layer keeps is counted: the down projection's
// output (T x hidden), or every projection's (with the adapters' x A^T
// columns of the fused q/k/v and gate/up GEMMs), per checkpointed layer.
TEST(MemoryPlanTest, KeptGemmOutputsAreCountedPerCheckpointedLayer) {
  const LlamaConfig c = Llama3_8B();
  MemoryPlanOptions o = Fleet(1, false);
  const int64_t T = o.micro_batch_size * o.seq_len, h = c.hidden_size, r = o.lora_r;
  auto kept = [&](int64_t layers, RecomputeKeep keep) -> int64_t {
    o.checkpoint_layers = layers;
    o.recompute_keep = keep;
    const MemoryPlan p = PlanMemory(c, o).value();
    for (const auto& [name, bytes] : p.device_items) {
      if (name.find("GEMM outputs kept") != std::string::npos) return bytes;
    }
    return 0;
  };
  EXPECT_EQ(kept(-1, RecomputeKeep::kNothing), 0);
  EXPECT_EQ(kept(-1, RecomputeKeep::kDownProj), 32 * T * h * 2);
  EXPECT_EQ(kept(10, RecomputeKeep::kDownProj), 10 * T * h * 2);
  EXPECT_EQ(kept(0, RecomputeKeep::kDownProj), 0);
  const int64_t columns = (c.q_size() + 2 * c.kv_size() + 3 * r) + h +
                          (2 * c.intermediate_size + 2 * r) + h;
  EXPECT_EQ(kept(-1, RecomputeKeep::kAllProjections), 32 * T * columns * 2);
  // And they raise the peak by as much (plus the allocator's share).
  o.checkpoint_layers = -1;
  o.recompute_keep = RecomputeKeep::kNothing;
  const int64_t none = PlanMemory(c, o).value().device_peak_bytes;
  o.recompute_keep = RecomputeKeep::kDownProj;
  const int64_t down = PlanMemory(c, o).value().device_peak_bytes;
  EXPECT_GE(down - none, 32 * T * h * 2);
  EXPECT_LE(down - none, static_cast<int64_t>(32 * T * h * 2 * 1.05));
  // Not with dense bases.
  o.quantize_base = false;
  EXPECT_EQ(kept(-1, RecomputeKeep::kAllProjections), 0);
}

TEST(MemoryPlanTest, RecomputeCostRanksWhatIsKept) {
  const LlamaConfig c = Llama3_8B();
  MemoryPlanOptions o = Fleet(1, false);
  EXPECT_EQ(RecomputeCost(c, o, 0, RecomputeKeep::kNothing), 0);
  const double none = RecomputeCost(c, o, 32, RecomputeKeep::kNothing);
  const double down = RecomputeCost(c, o, 32, RecomputeKeep::kDownProj);
  const double all = RecomputeCost(c, o, 32, RecomputeKeep::kAllProjections);
  EXPECT_LT(all, down);
  EXPECT_LT(down, none);
  EXPECT_DOUBLE_EQ(RecomputeCost(c, o, 16, RecomputeKeep::kNothing), none / 2);
  // 8B: down_proj is 14336 x 4096 of the layer's 218M GEMM weights.
  const double layer_gemm = 4096.0 * (4096 + 2 * 1024 + 4096 + 3 * 14336);
  EXPECT_NEAR((none - down) / (none - all), 14336.0 * 4096 / layer_gemm, 1e-9);
  EXPECT_NEAR(all / none, kNonGemmRecomputeShare / (1 + kNonGemmRecomputeShare), 1e-9);
  o.quantize_base = false;
  EXPECT_EQ(RecomputeCost(c, o, 32, RecomputeKeep::kAllProjections),
            RecomputeCost(c, o, 32, RecomputeKeep::kNothing));
}

// The side-by-side rows' memory caps: what `auto` picks at the Python peer's
// checkpointed peak (printed; the figures are in docs/performance.md).
TEST(MemoryPlanTest, ChoicesAtThePeersCheckpointedMemory) {
  struct Row {
    const char* name;
    LlamaConfig config;
    double peer_gib;
  };
  LlamaConfig shape70 = Llama3_70B();
  shape70.num_hidden_layers = 8;
  for (const Row& row : {Row{"8B", Llama3_8B(), 9.31}, Row{"70B 8/80", shape70, 10.75}}) {
    const MemoryPlanOptions o = Fleet(1, false);
    const auto budget = static_cast<int64_t>(row.peer_gib * kGiB);
    auto choice = ChooseCheckpointLayers(row.config, o, budget, /*allocator_budget=*/true).value();
    // The 70B shape's plan with every layer checkpointed is above 90% of
    // the peer's peak: no room to keep anything.
    if (!choice.fits) {
      EXPECT_EQ(choice.checkpoint_layers, row.config.num_hidden_layers);
      EXPECT_EQ(choice.recompute_keep, RecomputeKeep::kNothing);
    }
    const double full = RecomputeCost(row.config, o, row.config.num_hidden_layers,
                                      RecomputeKeep::kNothing);
    std::printf("%s capped at %.2f GiB: %s%lld of %lld layers checkpointed keeping %s, "
                "%lld keeping dequantized weights, plan %.2f GiB, recompute %.0f%% of full\n",
                row.name, row.peer_gib, choice.fits ? "" : "(does not fit) ",
                static_cast<long long>(choice.checkpoint_layers),
                static_cast<long long>(row.config.num_hidden_layers),
                RecomputeKeepName(choice.recompute_keep),
                static_cast<long long>(choice.dequantized_kept_layers),
                static_cast<double>(choice.plan.device_peak_bytes) / kGiB,
                100.0 * RecomputeCost(row.config, o, choice.checkpoint_layers,
                                      choice.recompute_keep) / full);
  }
}

TEST(MemoryPlanTest, Llama70BOnTheIssuesThreeFleets) {
  const LlamaConfig c = Llama3_70B();
  struct Case {
    const char* name;
    int world;
    bool offload;
    int64_t device_bytes;
  } cases[] = {
      {"2 x 24 GiB, offload", 2, true, 24 * kGiB},
      {"4 x 24 GiB", 4, false, 24 * kGiB},
      {"2 x 80 GiB", 2, false, 80 * kGiB},
      {"2 x 24 GiB, no offload", 2, false, 24 * kGiB},
  };
  for (const Case& k : cases) {
    auto p = PlanMemory(c, Fleet(k.world, k.offload));
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    std::printf("=== Llama-3-70B on %s (batch 1 x seq 2048, LoRA r 16 on all 7 projections, "
                "activation checkpointing, FULL_SHARD): %s\n%s",
                k.name, p->FitsDevice(k.device_bytes) ? "fits" : "DOES NOT FIT",
                p->ToString().c_str());
  }
  // What people run with QLoRA + FSDP: 2 x 24 GB with offload, 4 x 24 GB, 2 x
  // 80 GB all fit; 2 x 24 GB without offload cannot hold ~20 GiB of shards
  // plus the working set.
  EXPECT_TRUE(PlanMemory(c, Fleet(2, true)).value().FitsDevice(24 * kGiB));
  EXPECT_TRUE(PlanMemory(c, Fleet(4, false)).value().FitsDevice(24 * kGiB));
  EXPECT_TRUE(PlanMemory(c, Fleet(2, false)).value().FitsDevice(80 * kGiB));
  EXPECT_FALSE(PlanMemory(c, Fleet(2, false)).value().FitsDevice(24 * kGiB));
}

}  // namespace
}  // namespace ftune::trainer
