// FSDP across Gloo ranks forked on this machine (LocalRankGroup), each test
// body running in every rank process:
//   (a) gathered NF4 units are byte for byte QuantizeNf4Weight of the whole
//       tensors (double quantization included) for 2, 3 and 4 ranks, with
//       tensors whose blocks do not split evenly (padding, empty pieces) and
//       an odd element count;
//   (b) one forward + backward with rank r taking batch rows r::W (loss
//       scaled by 1/global_tokens): summed loss and reduce-scattered LoRA
//       grads equal the 1-rank full batch to 1e-5; after AdamW on shard()
//       and GatherParams the adapters equal 1-rank's, and so does the next
//       loss; (c) GradNorm / ClipGradNorm equal optim.h's on 1 rank;
//   (d) LoadShardedModel's peak RSS per rank stays within its share plus
//       one tensor, on a generated model several times that size;
//   (e) a peer killed mid-load, before the forward or before the backward,
//       or hung mid-load, makes the survivors' LoadShardedModel / forward /
//       backward fail with the collective's error within the timeout;
//   (f) with offload_params, ShardedLora takes the offloaded path (state in
//       host memory, optimizer on the host) and, on CPU ranks where that
//       moves nothing, trains bit for bit like without it;
//   and ranks given different options are refused before any data moves.
// The parent process never touches LibTorch (forking after LibTorch has
// started its thread pools is unsafe); every rank computes its own 1-rank
// reference.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "model_test_util.h"
#include "rank_harness.h"
#include "worker/comm/gloo_communicator.h"
#include "worker/comm/local_rendezvous.h"
#include "ftune/file_util.h"
#include "worker/trainer/fsdp.h"
#include "worker/modelio/init_model.h"
#include "worker/modelio/memory_plan.h"
#include "worker/trainer/optim.h"
#include "worker/modelio/safetensors.h"

namespace ftune::trainer {
namespace {

using comm::Communicator;
using comm::DataType;
using comm::testing::AllOk;
using comm::testing::Report;
using comm::testing::RunRanks;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

#define RANK_EXPECT(cond, what)                                                              \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      return Status(StatusCode::kInternal, std::string(__FILE__ ":") +                       \
                                               std::to_string(__LINE__) + ": " + #cond +     \
                                               ": " + std::string(what));                    \
    }                                                                                        \
  } while (false)

#define RANK_ASSIGN(lhs, expr) FTUNE_ASSIGN_OR_RETURN(lhs, expr)

Status MakeGloo(int rank, int world, const std::string& store, milliseconds timeout,
                std::unique_ptr<Communicator>* comm) {
  // Torch in a forked rank: one thread, the machine is shared.
  at::set_num_threads(1);
  std::unique_ptr<comm::LocalRendezvous> rdzv;
  FTUNE_RETURN_IF_ERROR(
      comm::LocalRendezvous::Connect(store, rank, world, milliseconds(60000), &rdzv));
  comm::GlooOptions options;
  options.host = "127.0.0.1";
  options.timeout = timeout;
  options.setup_timeout = milliseconds(60000);
  return comm::CreateGlooCommunicator(*rdzv, options, comm);
}

std::string Golden(const std::string& name) { return testing::GoldenDir() + "/" + name; }

// ------------------------------------------------------------ random models

// A temporary directory removed at scope exit.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/ftune_fsdp_test.XXXXXX";
    const char* d = ::mkdtemp(tmpl);
    path_ = d == nullptr ? std::string() : std::string(d);
  }
  ~TempDir() {
    if (!path_.empty()) (void)RemoveTree(path_);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct RandomLlama {
  int64_t hidden = 192;
  int64_t intermediate = 520;
  int64_t layers = 2;
  int64_t heads = 6;
  int64_t kv_heads = 2;
  int64_t vocab = 1000;
  bool tied = false;
  bool bf16 = true;  // file dtype
  uint64_t seed = 1;
};

uint16_t Bf16Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// config.json + model.safetensors with std-0.02 weights (norms near 1),
// written with plain C++ (the parent process must not start LibTorch).
Status WriteRandomLlama(const std::string& dir, const RandomLlama& s) {
  const int64_t head_dim = s.hidden / s.heads;
  char config[1024];
  std::snprintf(config, sizeof(config),
                R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": %lld, "intermediate_size": %lld, "num_hidden_layers": %lld,
  "num_attention_heads": %lld, "num_key_value_heads": %lld, "head_dim": %lld,
  "vocab_size": %lld, "max_position_embeddings": 256, "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0, "tie_word_embeddings": %s, "attention_bias": false,
  "mlp_bias": false, "hidden_act": "silu", "torch_dtype": "%s"})",
                static_cast<long long>(s.hidden), static_cast<long long>(s.intermediate),
                static_cast<long long>(s.layers), static_cast<long long>(s.heads),
                static_cast<long long>(s.kv_heads), static_cast<long long>(head_dim),
                static_cast<long long>(s.vocab), s.tied ? "true" : "false",
                s.bf16 ? "bfloat16" : "float32");
  FTUNE_RETURN_IF_ERROR(WriteFileAtomically(dir + "/config.json", config));
  // xorshift64*: uniform in [-0.0346, 0.0346) (std 0.02), fast enough to
  // write the RSS test's 400 MiB in a few seconds.
  uint64_t state = s.seed * 0x9E3779B97F4A7C15ull + 1;
  auto next_weight = [&state]() {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    const uint64_t r = state * 0x2545F4914F6CDD1Dull;
    const float u = static_cast<float>(r >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    return (u - 0.5f) * 0.0692820323f;
  };
  std::vector<std::string> names;
  std::vector<std::vector<uint64_t>> shapes;
  auto add = [&](const std::string& n, std::vector<uint64_t> shape) {
    names.push_back(n);
    shapes.push_back(std::move(shape));
  };
  const uint64_t h = s.hidden, in = s.intermediate, q = s.heads * head_dim,
                 kv = s.kv_heads * head_dim, v = s.vocab;
  add("model.embed_tokens.weight", {v, h});
  add("model.norm.weight", {h});
  if (!s.tied) add("lm_head.weight", {v, h});
  for (int64_t i = 0; i < s.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    add(p + "input_layernorm.weight", {h});
    add(p + "post_attention_layernorm.weight", {h});
    add(p + "self_attn.q_proj.weight", {q, h});
    add(p + "self_attn.k_proj.weight", {kv, h});
    add(p + "self_attn.v_proj.weight", {kv, h});
    add(p + "self_attn.o_proj.weight", {h, q});
    add(p + "mlp.gate_proj.weight", {in, h});
    add(p + "mlp.up_proj.weight", {in, h});
    add(p + "mlp.down_proj.weight", {h, in});
  }
  std::vector<std::vector<uint8_t>> data(names.size());
  std::vector<TensorToWrite> tensors;
  for (size_t k = 0; k < names.size(); ++k) {
    uint64_t n = 1;
    for (uint64_t d : shapes[k]) n *= d;
    const bool norm = names[k].find("norm") != std::string::npos;
    data[k].resize(n * (s.bf16 ? 2 : 4));
    for (uint64_t j = 0; j < n; ++j) {
      const float x = norm ? 1.0f + 5.0f * next_weight() : next_weight();
      if (s.bf16) {
        const uint16_t b = Bf16Bits(x);
        std::memcpy(data[k].data() + 2 * j, &b, 2);
      } else {
        std::memcpy(data[k].data() + 4 * j, &x, 4);
      }
    }
    tensors.push_back({names[k], s.bf16 ? Dtype::kBF16 : Dtype::kF32, shapes[k],
                       data[k].data(), data[k].size()});
  }
  return WriteSafetensors(dir + "/model.safetensors", tensors);
}

bool BitEqual(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined()) return a.defined() == b.defined();
  if (a.numel() != b.numel() || a.scalar_type() != b.scalar_type()) return false;
  at::Tensor x = a.contiguous().view(-1).view(at::kByte), y = b.contiguous().view(-1).view(at::kByte);
  return at::equal(x, y);
}

// "0.0516840033 (0x3d53b2a1)": an fp32 scalar to the bit.
std::string Bits(const at::Tensor& t) {
  const float v = t.item<float>();
  uint32_t u;
  std::memcpy(&u, &v, 4);
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g (0x%08x)", v, u);
  return buf;
}

const Nf4Linear& Nf4Of(const LoraLinear& l) { return dynamic_cast<const Nf4Linear&>(l.base()); }

// ------------------------------------------------------------ (a) NF4 bytes

class FsdpNf4BytesTest : public ::testing::TestWithParam<int> {};

// Every rank loads the generated model both ways and compares every unit's
// gathered bytes with the whole-tensor quantization.
TEST_P(FsdpNf4BytesTest, GatheredUnitsEqualWholeTensorQuantization) {
  const int world = GetParam();
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  RandomLlama spec;  // q: 576 blocks, k/v: 192, MLP: 1560 (uneven over 3 and 4 ranks)
  ASSERT_TRUE(WriteRandomLlama(dir.path(), spec).ok());
  const std::string model_dir = dir.path();
  auto exits = RunRanks(
      world,
      [&](int rank, const std::string& store) -> Status {
        std::unique_ptr<Communicator> comm;
        FTUNE_RETURN_IF_ERROR(MakeGloo(rank, world, store, milliseconds(60000), &comm));
        // One rank runs without a communicator, as LoadShardedModel allows.
        Communicator* shard_comm = world == 1 ? nullptr : comm.get();
        for (const auto& [nested, dtype] : {std::pair{true, at::kFloat}, std::pair{false, at::kFloat},
                                            std::pair{true, at::kBFloat16}}) {
          ModelOptions options = DefaultModelOptions(c10::kCPU);
          options.dtype = dtype;  // bf16: quantized from bf16 values, bf16 dense segments
          options.quantize_base = true;
          options.nf4.double_quant = nested;
          RANK_ASSIGN(std::unique_ptr<LlamaModel> whole, LlamaModel::Load(model_dir, options));
          LoadStats stats;
          RANK_ASSIGN(std::unique_ptr<LlamaModel> sharded,
                      LoadShardedModel(model_dir, options, FsdpOptions(), shard_comm, &stats));
          FsdpUnits* units = FsdpUnitsOf(*sharded);
          RANK_EXPECT(units != nullptr, "no FsdpUnits installed");
          RANK_EXPECT(units->num_units() == spec.layers + 2, std::to_string(units->num_units()));
          int64_t compared = 0;
          for (int64_t u = 0; u < units->num_units(); ++u) {
            RANK_EXPECT(!units->resident(u), "unit resident before any gather");
            FTUNE_RETURN_IF_ERROR(units->GatherUnit(u));
            if (u == LlamaModel::kEmbeddingUnit) {
              RANK_EXPECT(BitEqual(sharded->embed_tokens(), whole->embed_tokens()), "embedding");
            } else if (u == sharded->head_unit()) {
              RANK_EXPECT(BitEqual(sharded->final_norm(), whole->final_norm()), "final norm");
              RANK_EXPECT(BitEqual(sharded->lm_head(), whole->lm_head()), "lm_head");
            } else {
              const int64_t i = u - 1;
              const DecoderLayer& a = sharded->layers()[i];
              const DecoderLayer& b = whole->layers()[i];
              RANK_EXPECT(BitEqual(a.input_layernorm, b.input_layernorm), "input_layernorm");
              RANK_EXPECT(BitEqual(a.post_attention_layernorm, b.post_attention_layernorm),
                          "post_attention_layernorm");
              for (const char* m : {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"}) {
                const Nf4Weight& x = Nf4Of(*a.Module(m)).weight();
                const Nf4Weight& y = Nf4Of(*b.Module(m)).weight();
                const std::string what = "layer " + std::to_string(i) + " " + m +
                                         (nested ? " nested" : " plain") +
                                         (dtype == at::kFloat ? " fp32" : " bf16");
                RANK_EXPECT(x.nested() == nested && y.nested() == nested, what);
                RANK_EXPECT(BitEqual(x.packed, y.packed), what + ": packed bytes differ");
                RANK_EXPECT(BitEqual(x.absmax, y.absmax), what + ": absmax differs");
                if (nested) {
                  RANK_EXPECT(BitEqual(x.nested_absmax, y.nested_absmax),
                              what + ": nested absmax differs");
                  RANK_EXPECT(BitEqual(x.offset, y.offset),
                              what + ": nested offset " + std::to_string(x.offset.item<float>()) +
                                  " vs " + std::to_string(y.offset.item<float>()));
                }
                ++compared;
              }
            }
            units->ReleaseUnit(u);
            RANK_EXPECT(!units->resident(u), "unit resident after release");
          }
          RANK_EXPECT(compared == 7 * spec.layers, std::to_string(compared));
          if (rank == 0) {
            std::printf("world %d %s %s: %lld projections byte-identical; shard %lld bytes/rank\n",
                        world, nested ? "nested" : "plain", dtype == at::kFloat ? "fp32" : "bf16",
                        static_cast<long long>(compared),
                        static_cast<long long>(stats.shard_bytes));
          }
        }

        // Odd element counts and more ranks than nested blocks, through the
        // piece API: (7, 33) = 231 elements, (3, 16704) = 784 blocks.
        for (auto shape : {std::vector<int64_t>{7, 33}, std::vector<int64_t>{3, 16704},
                           std::vector<int64_t>{1, 64 * 256 * 4}}) {
          for (bool bf16 : {false, true}) {
            at::Generator gen = at::detail::createCPUGenerator(shape[0] * 1000 + shape[1]);
            at::Tensor w = at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
            if (bf16) w = w.to(at::kBFloat16);
            Nf4Options o;
            const Nf4Weight ref = QuantizeNf4Weight(w, o);
            const Nf4ShardGeometry g = Nf4ShardGeometry::Make(w.numel(), o, world);
            at::Tensor part = w.reshape(-1).slice(0, g.ElementBegin(rank), g.ElementEnd(rank));
            RANK_ASSIGN(Nf4ShardPieces pieces, QuantizeNf4Part(part, g, rank, shard_comm, "w"));
            RANK_ASSIGN(Nf4Weight got, GatherNf4Pieces(pieces, g, shape[0], shape[1], shard_comm));
            const std::string what = std::to_string(shape[0]) + "x" + std::to_string(shape[1]);
            RANK_EXPECT(BitEqual(got.packed, ref.packed), what + " packed");
            RANK_EXPECT(BitEqual(got.absmax, ref.absmax), what + " absmax");
            RANK_EXPECT(BitEqual(got.nested_absmax, ref.nested_absmax), what + " absmax2");
            RANK_EXPECT(BitEqual(got.offset, ref.offset), what + " offset");
          }
        }
        return OkStatus();
      },
      milliseconds(300000));
  ASSERT_TRUE(AllOk(exits, world)) << Report(exits);
  std::printf("%s", exits[0].output.c_str());
}

INSTANTIATE_TEST_SUITE_P(Ranks, FsdpNf4BytesTest, ::testing::Values(1, 2, 3, 4),
                         [](const auto& info) { return std::to_string(info.param) + "ranks"; });

// ------------------------------------------------------------ (b), (c) training

struct TrainCase {
  const char* model;  // golden model directory
  int world;
  bool reshard_after_forward;
  bool offload;
  bool quantize;
  int micro_batches = 1;  // each rank's rows split into this many accumulated backwards
  // Off: autograd keeps the gathered tensors it saved, backward re-gathers nothing.
  bool checkpointing = true;
  bool prefetch = false;  // FsdpOptions::prefetch (a background gather thread on Gloo)
};

class FsdpTrainTest : public ::testing::TestWithParam<TrainCase> {};

// The flat LoRA vector of per-tensor values (params or grads).
at::Tensor Flat(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> f;
  for (const at::Tensor& t : ts) f.push_back(t.detach().reshape(-1).to(at::kFloat));
  return at::cat(f);
}

std::vector<at::Tensor> Grads(const LlamaModel& m) {
  std::vector<at::Tensor> g;
  for (const NamedTensor& p : m.LoraParameters()) g.push_back(p.tensor.grad());
  return g;
}
std::vector<at::Tensor> Params(const LlamaModel& m) {
  std::vector<at::Tensor> g;
  for (const NamedTensor& p : m.LoraParameters()) g.push_back(p.tensor);
  return g;
}

// Every rank's shard of `shard` gathered (padded length world * numel).
Result<at::Tensor> GatherShards(Communicator* comm, const at::Tensor& shard) {
  at::Tensor s = shard.detach().contiguous();
  at::Tensor all = at::empty({s.numel() * comm->size()}, s.options());
  FTUNE_RETURN_IF_ERROR(comm->AllGather(s.data_ptr(), all.data_ptr(),
                                               static_cast<size_t>(s.numel()), DataType::kFloat32,
                                               nullptr));
  return all;
}

Result<double> SumOverRanks(Communicator* comm, double v) {
  std::vector<double> all(comm->size());
  FTUNE_RETURN_IF_ERROR(
      comm->AllGather(&v, all.data(), sizeof(double), DataType::kUInt8, nullptr));
  double s = 0;
  for (double x : all) s += x;
  return s;
}

TEST_P(FsdpTrainTest, ShardedStepEqualsOneRank) {
  const TrainCase tc = GetParam();
  const int world = tc.world;
  auto exits = RunRanks(
      world,
      [&](int rank, const std::string& store) -> Status {
        std::unique_ptr<Communicator> comm;
        FTUNE_RETURN_IF_ERROR(MakeGloo(rank, world, store, milliseconds(60000), &comm));
        const std::string dir = Golden(tc.model);
        const std::string adapter = Golden(std::string(tc.model) + "_adapter");
        ModelOptions options = DefaultModelOptions(c10::kCPU);
        options.quantize_base = tc.quantize;
        options.activation_checkpointing = tc.checkpointing;
        options.attention = AttentionImpl::kMath;

        // The batch: 12 rows (divisible by 2, 3, 4), some targets ignored.
        at::Generator gen = at::detail::createCPUGenerator(7);
        const int64_t batch = 12, seq = 16;
        at::Tensor ids = at::randint(0, 128, {batch, seq}, gen, at::TensorOptions().dtype(at::kLong));
        at::Tensor labels = ids.clone();
        labels.view(-1).slice(0, 0, labels.numel(), 5).fill_(-100);
        const int64_t global_tokens = LlamaModel::CountLossTokens(labels, at::Tensor());

        // 1 rank, full batch.
        RANK_ASSIGN(std::unique_ptr<LlamaModel> ref, LlamaModel::Load(dir, options));
        FTUNE_RETURN_IF_ERROR(ref->LoadAdapter(adapter));
        LossOutput ro = ref->Loss(ids, at::Tensor(), labels, /*training=*/true);
        at::Tensor rloss = ro.loss_sum / static_cast<double>(global_tokens);
        rloss.backward();
        const double ref_loss = rloss.item<double>();
        const at::Tensor ref_grads = Flat(Grads(*ref));
        const double ref_norm = GradNorm(Params(*ref));
        const double max_norm = ref_norm / 3;  // clipping active
        const double ref_clip_norm = ClipGradNorm(Params(*ref), max_norm);
        const at::Tensor ref_clipped = Flat(Grads(*ref));
        AdamWOptions adam;
        adam.lr = 1e-2;
        AdamW ref_opt(Params(*ref), adam);
        ref_opt.Step(adam.lr);
        const at::Tensor ref_params = Flat(Params(*ref));
        ref_opt.ZeroGrad();
        double ref_loss2;
        {
          c10::NoGradGuard no_grad;
          ref_loss2 = ref->Loss(ids, at::Tensor(), labels, false).loss_sum.item<double>() /
                      global_tokens;
        }

        // W ranks, rows r::W each.
        FsdpOptions fsdp;
        fsdp.reshard_after_forward = tc.reshard_after_forward;
        fsdp.offload_params = tc.offload;
        fsdp.prefetch = tc.prefetch;
        Communicator* shard_comm = world == 1 ? nullptr : comm.get();  // 1 rank: none at all
        RANK_ASSIGN(std::unique_ptr<LlamaModel> m,
                    LoadShardedModel(dir, options, fsdp, shard_comm));
        FTUNE_RETURN_IF_ERROR(m->LoadAdapter(adapter));
        RANK_ASSIGN(std::unique_ptr<ShardedLora> lora, ShardedLora::Create(m.get(), shard_comm));
        RANK_EXPECT(lora->offloaded() == tc.offload, "the units' offload_params did not reach it");
        RANK_EXPECT(lora->total_numel() == ref_grads.numel(), "total_numel");
        RANK_EXPECT(lora->shard_numel() * world >= lora->total_numel(), "shard_numel");
        RANK_EXPECT(lora->layout().size() == ref->LoraParameters().size(), "layout");
        at::Tensor my_ids = ids.slice(0, rank, batch, world);
        at::Tensor my_labels = labels.slice(0, rank, batch, world);
        FsdpUnits* units = FsdpUnitsOf(*m);
        double my_loss = 0;
        const int64_t rows = my_ids.size(0);
        for (int mb = 0; mb < tc.micro_batches; ++mb) {
          const int64_t r0 = rows * mb / tc.micro_batches, r1 = rows * (mb + 1) / tc.micro_batches;
          LossOutput mo = m->Loss(my_ids.slice(0, r0, r1), at::Tensor(),
                                  my_labels.slice(0, r0, r1), /*training=*/true);
          // Between forward and backward: FULL_SHARD keeps only the head
          // unit, SHARD_GRAD_OP every decoder layer too.
          for (int64_t u = 0; u < units->num_units(); ++u) {
            const bool layer = u != LlamaModel::kEmbeddingUnit && u != m->head_unit();
            const bool want = u == m->head_unit() || (layer && !tc.reshard_after_forward) ||
                              (u == LlamaModel::kEmbeddingUnit &&
                               m->config().tie_word_embeddings);
            RANK_EXPECT(units->resident(u) == want,
                        "unit " + std::to_string(u) + " resident " +
                            std::to_string(units->resident(u)) + " between forward and backward");
          }
          at::Tensor mloss = mo.loss_sum / static_cast<double>(global_tokens);
          const double reduced_before = lora->reduce_scatter_seconds();
          mloss.backward();
          my_loss += mloss.item<double>();
          // The layers' gradients were reduced during backward (per-layer
          // hooks), not left for ReduceGradients.
          RANK_EXPECT(world == 1 || lora->reduce_scatter_seconds() > reduced_before,
                      "no gradient reduction during backward");
          for (int64_t u = 0; u < units->num_units(); ++u) {
            RANK_EXPECT(!units->resident(u), "unit " + std::to_string(u) + " resident after backward");
          }
        }
        FTUNE_RETURN_IF_ERROR(lora->ReduceGradients());
        for (const NamedTensor& p : m->LoraParameters()) {
          RANK_EXPECT(!p.tensor.grad().defined(), p.name + ": full grad kept after the reduction");
        }
        if (world > 1) {
          // Every gather and the reduce-scatter were timed; compute cannot
          // have waited longer than a gather took.
          const double busy = units->gather_busy_seconds();
          const double exposed = units->gather_exposed_seconds();
          RANK_EXPECT(busy > 0, "gather busy seconds " + std::to_string(busy));
          RANK_EXPECT(exposed >= 0 && exposed <= busy,
                      "gather exposed " + std::to_string(exposed) + " vs busy " +
                          std::to_string(busy));
          if (!tc.prefetch) {
            RANK_EXPECT(exposed == busy, "without prefetch every gather is exposed");
          }
          RANK_EXPECT(lora->reduce_scatter_seconds() > 0, "reduce-scatter not timed");
        }
        RANK_ASSIGN(double loss, SumOverRanks(comm.get(), my_loss));
        const double loss_rel = std::abs(loss - ref_loss) / std::abs(ref_loss);
        RANK_EXPECT(loss_rel <= 1e-5, "loss " + std::to_string(loss) + " vs " + std::to_string(ref_loss));

        RANK_ASSIGN(at::Tensor grads, GatherShards(comm.get(), lora->shard().grad()));
        grads = grads.narrow(0, 0, lora->total_numel());
        const double grad_rel = testing::RelDiff(grads, ref_grads);
        double worst_tensor = 0;
        for (const ShardedLora::Entry& e : lora->layout()) {
          worst_tensor = std::max(worst_tensor, testing::RelL2(grads.narrow(0, e.offset, e.numel),
                                                               ref_grads.narrow(0, e.offset, e.numel)));
        }
        RANK_EXPECT(grad_rel <= 1e-5, "grads max-abs rel " + std::to_string(grad_rel));
        RANK_EXPECT(worst_tensor <= 1e-5, "worst per-tensor L2 rel " + std::to_string(worst_tensor));

        RANK_ASSIGN(double norm, lora->GradNorm());
        RANK_ASSIGN(double clip_norm, lora->ClipGradNorm(max_norm));
        const double norm_rel = std::abs(norm - ref_norm) / ref_norm;
        RANK_EXPECT(norm_rel <= 1e-5, "grad norm " + std::to_string(norm) + " vs " +
                                          std::to_string(ref_norm));
        RANK_EXPECT(std::abs(clip_norm - ref_clip_norm) / ref_clip_norm <= 1e-5, "clip norm");
        RANK_ASSIGN(at::Tensor clipped, GatherShards(comm.get(), lora->shard().grad()));
        const double clip_rel =
            testing::RelDiff(clipped.narrow(0, 0, lora->total_numel()), ref_clipped);
        RANK_EXPECT(clip_rel <= 1e-5, "clipped grads rel " + std::to_string(clip_rel));

        // The same AdamW step per tensor, as the 1-rank loop runs it, on this
        // run's own clipped gradients: the flat sharded step must give the
        // same bits.
        const at::Tensor before = Flat(Params(*m)).clone();
        at::Tensor own_clipped = clipped.narrow(0, 0, lora->total_numel());
        std::vector<at::Tensor> mirror;
        for (const ShardedLora::Entry& e : lora->layout()) {
          at::Tensor t = before.narrow(0, e.offset, e.numel).view(e.shape).clone();
          t.set_requires_grad(true);
          t.mutable_grad() = own_clipped.narrow(0, e.offset, e.numel).view(e.shape).clone();
          mirror.push_back(t);
        }
        AdamW mirror_opt(mirror, adam);
        mirror_opt.Step(adam.lr);
        const at::Tensor mirror_params = Flat(mirror);

        AdamW opt({lora->shard()}, adam);
        opt.Step(adam.lr);
        opt.ZeroGrad();
        FTUNE_RETURN_IF_ERROR(lora->GatherParams());
        const at::Tensor params = Flat(Params(*m));
        RANK_EXPECT(at::equal(params, mirror_params),
                    "sharded AdamW + GatherParams differs from per-tensor AdamW by " +
                        std::to_string(testing::MaxAbsDiff(params, mirror_params)));
        // Against the 1-rank run: its gradients differ by summation order
        // (above), and Adam's first step, g / (|g| + eps), turns that noise
        // into visible differences on elements whose gradient is near eps
        // (a 9e-8 gradient differing by 3e-10 moves its parameter by 6e-6),
        // so the bound is on the whole vector (L2) and on the worst element
        // against one step (lr).
        const double param_rel = testing::RelL2(params, ref_params);
        const double param_abs = testing::MaxAbsDiff(params, ref_params);
        RANK_EXPECT(param_rel <= 1e-5, "params after AdamW L2 rel " + std::to_string(param_rel));
        RANK_EXPECT(param_abs <= 0.01 * adam.lr,
                    "params after AdamW max abs " + std::to_string(param_abs));

        // The next forward uses the gathered parameters.
        double loss2_part;
        {
          c10::NoGradGuard no_grad;
          loss2_part = m->Loss(my_ids, at::Tensor(), my_labels, false).loss_sum.item<double>() /
                       global_tokens;
        }
        RANK_ASSIGN(double loss2, SumOverRanks(comm.get(), loss2_part));
        const double loss2_rel = std::abs(loss2 - ref_loss2) / std::abs(ref_loss2);
        RANK_EXPECT(loss2_rel <= 1e-5, "loss after the step " + std::to_string(loss2) + " vs " +
                                           std::to_string(ref_loss2));
        RANK_EXPECT(std::abs(loss2 - loss) > 1e-4 * std::abs(loss), "the step changed nothing");
        // The FSDP schedule, counted: each forward gathers the embedding,
        // every layer and the head (and the embedding again for a tied
        // head); each checkpointed FULL_SHARD backward re-gathers every
        // layer; SHARD_GRAD_OP or no checkpointing re-gathers nothing. With
        // prefetch every layer and the head of a forward, and every layer
        // but the last of a backward, are served by a prefetch.
        const int64_t L = m->config().num_hidden_layers;
        const int64_t fwd = 2 + L + (m->config().tie_word_embeddings ? 1 : 0);
        const bool regather = tc.reshard_after_forward && tc.checkpointing;
        const int64_t want_gathers =
            world == 1 ? 0 : tc.micro_batches * (fwd + (regather ? L : 0)) + fwd;
        const int64_t want_hits = world == 1 || !tc.prefetch
                                      ? 0
                                      : tc.micro_batches * (L + 1 + (regather ? L - 1 : 0)) + L + 1;
        RANK_EXPECT(units->gathers() == want_gathers,
                    std::to_string(units->gathers()) + " gathers, want " +
                        std::to_string(want_gathers));
        RANK_EXPECT(units->prefetch_hits() == want_hits,
                    std::to_string(units->prefetch_hits()) + " prefetch hits, want " +
                        std::to_string(want_hits));
        if (rank == 0) {
          std::printf("%s world %d reshard %d offload %d nf4 %d micro-batches %d checkpointing %d "
                      "prefetch %d: loss %.9g (1 rank %.9g, rel %.2e); "
                      "grads max-abs rel %.2e, worst tensor L2 rel %.2e; norm %.9g (rel %.2e), "
                      "clipped rel %.2e; params after AdamW L2 rel %.2e (max abs %.2e, lr 1e-2), bit-equal to "
                      "per-tensor AdamW; next loss rel "
                      "%.2e; %lld unit gathers (%lld prefetched, %.2f MiB received, %.1f ms)\n",
                      tc.model, world, tc.reshard_after_forward, tc.offload, tc.quantize,
                      tc.micro_batches, tc.checkpointing, tc.prefetch, loss,
                      ref_loss, loss_rel, grad_rel, worst_tensor, norm, norm_rel, clip_rel,
                      param_rel, param_abs, loss2_rel, static_cast<long long>(units->gathers()),
                      static_cast<long long>(units->prefetch_hits()),
                      units->gathered_bytes_total() / 1048576.0, units->gather_seconds() * 1e3);
        }
        return OkStatus();
      },
      milliseconds(300000));
  ASSERT_TRUE(AllOk(exits, world)) << Report(exits);
  std::printf("%s", exits[0].output.c_str());
}

INSTANTIATE_TEST_SUITE_P(
    Cases, FsdpTrainTest,
    ::testing::Values(TrainCase{"llama2_tiny", 1, true, false, true},
                      TrainCase{"llama2_tiny", 2, true, false, true},
                      TrainCase{"llama2_tiny", 3, true, false, true},
                      TrainCase{"llama2_tiny", 4, true, false, true},
                      TrainCase{"llama3_tiny", 3, true, false, true},
                      TrainCase{"qwen2_tiny", 3, true, false, true},
                      TrainCase{"qwen2_tiny", 2, false, true, true},
                      TrainCase{"mistral_tiny", 2, true, false, true},
                      TrainCase{"llama2_tiny", 2, false, true, true},
                      TrainCase{"llama3_tiny", 4, true, false, false},
                      TrainCase{"llama2_tiny", 3, true, false, true, 2},
                      TrainCase{"llama2_tiny", 2, true, false, true, 1, false},
                      TrainCase{"llama2_tiny", 4, true, false, true, 1, true, true},
                      TrainCase{"llama3_tiny", 2, true, false, true, 2, true, true},
                      TrainCase{"llama2_tiny", 3, false, false, true, 1, true, true}),
    [](const auto& info) {
      const TrainCase& c = info.param;
      return std::string(c.model) + "_" + std::to_string(c.world) + "ranks" +
             (c.reshard_after_forward ? "_full_shard" : "_shard_grad_op") +
             (c.offload ? "_offload" : "") + (c.quantize ? "_nf4" : "_dense") +
             (c.micro_batches > 1 ? "_accum" + std::to_string(c.micro_batches) : "") +
             (c.checkpointing ? "" : "_no_checkpointing") + (c.prefetch ? "_prefetch" : "");
    });

// ------------------------------------------------------------ (d) RSS

int64_t ProcBytes(const char* key) {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return 0;
  char line[256];
  int64_t kb = 0;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, key, std::strlen(key)) == 0) kb = std::atoll(line + std::strlen(key));
  }
  std::fclose(f);
  return kb * 1024;
}

// 12 layers of hidden 1024 (about 220M parameters): big enough that loading
// and step time are dominated by the model, not by overheads.
RandomLlama MediumLlama() {
  RandomLlama spec;
  spec.hidden = 1024;
  spec.intermediate = 4096;
  spec.layers = 12;
  spec.heads = 8;
  spec.kv_heads = 8;
  spec.vocab = 8192;
  return spec;
}

TEST(FsdpLoadTest, PeakRssPerRankIsItsShareAndOneTensor) {
  constexpr int kWorld = 4;
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  const RandomLlama spec = MediumLlama();
  ASSERT_TRUE(WriteRandomLlama(dir.path(), spec).ok());
  const std::string model_dir = dir.path();
  int64_t file_bytes = 0;
  {
    auto file = SafetensorsFile::Open(model_dir + "/model.safetensors");
    ASSERT_TRUE(file.ok()) << file.status().ToString();
    file_bytes = static_cast<int64_t>((*file)->file_size());
  }
  auto exits = RunRanks(
      kWorld,
      [&](int rank, const std::string& store) -> Status {
        std::unique_ptr<Communicator> comm;
        FTUNE_RETURN_IF_ERROR(MakeGloo(rank, kWorld, store, milliseconds(120000), &comm));
        ModelOptions options = DefaultModelOptions(c10::kCPU);
        options.quantize_base = true;
        {
          // Warm up: the first use of each LibTorch kernel faults in its code
          // pages (file-backed, counted in RSS) whatever the model's size.
          RANK_ASSIGN(std::unique_ptr<LlamaModel> tiny,
                      LoadShardedModel(Golden("llama2_tiny"), options, FsdpOptions(), comm.get()));
        }
        LoadStats stats;
        RANK_ASSIGN(std::unique_ptr<LlamaModel> m,
                    LoadShardedModel(model_dir, options, FsdpOptions(), comm.get(), &stats));
        const int64_t growth = stats.peak_rss_bytes - stats.start_rss_bytes;
        // Share + one tensor, plus 8 MiB for the allocator's and the
        // kernel's granularity.
        const int64_t bound = stats.shard_bytes + stats.largest_tensor_bytes + (8 << 20);
        std::printf("rank %d: file %.1f MiB, read %.1f MiB, shard %.1f MiB, largest tensor %.1f MiB, "
                    "RSS %.1f -> peak %.1f MiB (+%.1f MiB, bound %.1f MiB) -> %.1f MiB after, %.2f s\n",
                    rank, file_bytes / 1048576.0, stats.read_bytes / 1048576.0,
                    stats.shard_bytes / 1048576.0, stats.largest_tensor_bytes / 1048576.0,
                    stats.start_rss_bytes / 1048576.0, stats.peak_rss_bytes / 1048576.0,
                    growth / 1048576.0, bound / 1048576.0, stats.end_rss_bytes / 1048576.0,
                    stats.seconds);
        std::fflush(stdout);
        RANK_EXPECT(stats.unit_count == spec.layers + 2, std::to_string(stats.unit_count));
        RANK_EXPECT(growth <= bound, "peak RSS grew " + std::to_string(growth) +
                                         " bytes, bound " + std::to_string(bound));
        RANK_EXPECT(file_bytes >= 4 * bound, "the model is not several times the bound");
        // What stays is the shard (plus allocator slack).
        RANK_EXPECT(stats.end_rss_bytes - stats.start_rss_bytes <= stats.shard_bytes + (8 << 20),
                    "RSS after loading " + std::to_string(stats.end_rss_bytes));
        // Only this rank's ranges were read: a quarter of the tensors, give
        // or take the padding of the last pieces.
        RANK_EXPECT(stats.read_bytes <= file_bytes / kWorld + (1 << 20),
                    "read " + std::to_string(stats.read_bytes));
        // PlanMemory's arithmetic predicts this shard (to the 64-byte
        // alignment of each segment).
        MemoryPlanOptions plan_options;
        plan_options.world_size = kWorld;
        plan_options.compute_dtype_bytes = 4;
        RANK_ASSIGN(MemoryPlan plan, PlanMemory(m->config(), plan_options));
        const double plan_rel =
            std::abs(static_cast<double>(plan.frozen_shard_bytes - stats.shard_bytes)) /
            static_cast<double>(stats.shard_bytes);
        std::printf("rank %d: PlanMemory predicts a %.3f MiB shard (measured %.3f MiB, rel %.1e)\n",
                    rank, plan.frozen_shard_bytes / 1048576.0, stats.shard_bytes / 1048576.0,
                    plan_rel);
        RANK_EXPECT(plan.frozen_shard_bytes <= stats.shard_bytes && plan_rel < 1e-3,
                    "PlanMemory frozen shard " + std::to_string(plan.frozen_shard_bytes) +
                        " vs " + std::to_string(stats.shard_bytes));
        // And the model works: one no-grad forward gathers every unit.
        c10::NoGradGuard no_grad;
        at::Tensor ids = at::arange(8, at::TensorOptions().dtype(at::kLong)).view({1, 8});
        at::Tensor logits = m->Logits(ids, at::Tensor());
        RANK_EXPECT(logits.sizes() == at::IntArrayRef({1, 8, spec.vocab}), "logits shape");
        RANK_EXPECT(logits.isfinite().all().item<bool>(), "non-finite logits");
        if (rank == 0) {
          // For contrast (printed only): the unsharded loader on the same
          // model, peak measured the same way.
          m.reset();
          const int64_t before = ProcBytes("VmRSS:");
          {
            FILE* f = std::fopen("/proc/self/clear_refs", "w");
            if (f != nullptr) {
              std::fputs("5", f);
              std::fclose(f);
            }
          }
          RANK_ASSIGN(std::unique_ptr<LlamaModel> whole, LlamaModel::Load(model_dir, options));
          std::printf("rank 0: LlamaModel::Load of the same model (no sharding): peak +%.1f MiB\n",
                      (ProcBytes("VmHWM:") - before) / 1048576.0);
        }
        return OkStatus();
      },
      milliseconds(400000));
  ASSERT_TRUE(AllOk(exits, kWorld)) << Report(exits);
  for (const auto& e : exits) std::printf("%s", e.output.c_str());
}

// Ranks given different options fail with a clear error instead of running
// mismatched collectives.
TEST(FsdpConsistencyTest, RanksWithDifferentOptionsOrAdaptersAreRefused) {
  constexpr int kWorld = 2;
  auto exits = RunRanks(
      kWorld,
      [&](int rank, const std::string& store) -> Status {
        std::unique_ptr<Communicator> comm;
        FTUNE_RETURN_IF_ERROR(MakeGloo(rank, kWorld, store, milliseconds(60000), &comm));
        ModelOptions options = DefaultModelOptions(c10::kCPU);
        options.quantize_base = true;
        options.nf4.double_quant = rank == 0;
        auto m = LoadShardedModel(Golden("llama2_tiny"), options, FsdpOptions(), comm.get());
        RANK_EXPECT(!m.ok(), "ranks with different double_quant loaded");
        RANK_EXPECT(m.status().code() == StatusCode::kFailedPrecondition, m.status().ToString());
        RANK_EXPECT(m.status().message().find("differs between rank") != std::string::npos,
                    m.status().ToString());
        options.nf4.double_quant = true;
        RANK_ASSIGN(std::unique_ptr<LlamaModel> ok,
                    LoadShardedModel(Golden("llama2_tiny"), options, FsdpOptions(), comm.get()));
        LoraConfig lora;
        lora.r = rank == 0 ? 4 : 8;
        FTUNE_RETURN_IF_ERROR(ok->AttachLora(lora));
        auto sl = ShardedLora::Create(ok.get(), comm.get());
        RANK_EXPECT(!sl.ok(), "ranks with different LoRA ranks sharded");
        RANK_EXPECT(sl.status().message().find("LoRA layout") != std::string::npos,
                    sl.status().ToString());
        return OkStatus();
      },
      milliseconds(120000));
  ASSERT_TRUE(AllOk(exits, kWorld)) << Report(exits);
}

// Manual: --gtest_also_run_disabled_tests --gtest_filter='*Bench*'. Step time
// of 2 Gloo ranks on a generated model (hidden 1024, 12 layers, NF4), with
// and without prefetch; prints figures, asserts only that both steps agree.
// model.random_weights: each rank generates its own elements of every
// frozen tensor (no safetensors read) and gets exactly the model built
// from the files `ftune-rank init-model` writes, for 1 and 2 ranks.
TEST(FsdpRandomWeightsTest, GeneratedWeightsEqualInitModelFiles) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  Result<LlamaConfig> config = InitModelPresetConfig("tiny", 512);
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  config->num_hidden_layers = 2;
  constexpr uint64_t kSeed = 11;
  ASSERT_TRUE(WriteRandomLlamaWeights(dir.path(), *config, kSeed, 5'000'000'000ull, 2, nullptr).ok());
  ASSERT_TRUE(WriteFileAtomically(dir.path() + "/config.json", LlamaConfigToJson(*config)).ok());
  const std::string model_dir = dir.path();
  for (int world : {1, 2}) {
    auto exits = RunRanks(
        world,
        [&](int rank, const std::string& store) -> Status {
          std::unique_ptr<Communicator> comm;
          FTUNE_RETURN_IF_ERROR(MakeGloo(rank, world, store, milliseconds(60000), &comm));
          Communicator* c = world == 1 ? nullptr : comm.get();
          ModelOptions options = DefaultModelOptions(c10::kCPU);
          options.quantize_base = true;
          at::Tensor ids = at::arange(2 * 24, at::TensorOptions().dtype(at::kLong))
                               .mul(37)
                               .remainder(config->vocab_size)
                               .view({2, 24});
          at::Tensor logits[2];
          for (int random = 0; random < 2; ++random) {
            options.random_weights = random == 1;
            options.random_seed = kSeed;
            LoadStats stats;
            RANK_ASSIGN(std::unique_ptr<LlamaModel> m,
                        LoadShardedModel(model_dir, options, FsdpOptions(), c, &stats));
            RANK_EXPECT(random == 0 || stats.read_bytes == 0,
                        "random weights read " + std::to_string(stats.read_bytes) + " bytes");
            c10::NoGradGuard no_grad;
            logits[random] = m->Logits(ids, at::Tensor());
          }
          RANK_EXPECT(BitEqual(logits[0], logits[1]),
                      "logits from generated weights differ from the files' on " +
                          std::to_string(world) + " ranks");
          // Another seed is another model.
          options.random_weights = true;
          options.random_seed = kSeed + 1;
          RANK_ASSIGN(std::unique_ptr<LlamaModel> other,
                      LoadShardedModel(model_dir, options, FsdpOptions(), c));
          c10::NoGradGuard no_grad;
          RANK_EXPECT(!BitEqual(logits[0], other->Logits(ids, at::Tensor())),
                      "the seed changed nothing");
          return OkStatus();
        },
        milliseconds(120000));
    EXPECT_TRUE(AllOk(exits, world)) << world << " ranks: " << Report(exits);
  }
}

TEST(FsdpBenchTest, DISABLED_StepTimeWithAndWithoutPrefetch) {
  constexpr int kWorld = 2;
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  const RandomLlama spec = MediumLlama();
  ASSERT_TRUE(WriteRandomLlama(dir.path(), spec).ok());
  const std::string model_dir = dir.path();
  auto exits = RunRanks(
      kWorld,
      [&](int rank, const std::string& store) -> Status {
        std::unique_ptr<Communicator> comm;
        FTUNE_RETURN_IF_ERROR(MakeGloo(rank, kWorld, store, milliseconds(120000), &comm));
        ModelOptions options = DefaultModelOptions(c10::kCPU);
        options.quantize_base = true;
        options.activation_checkpointing = true;
        double losses[2];
        for (bool prefetch : {false, true}) {
          FsdpOptions fsdp;
          fsdp.prefetch = prefetch;
          RANK_ASSIGN(std::unique_ptr<LlamaModel> m,
                      LoadShardedModel(model_dir, options, fsdp, comm.get()));
          LoraConfig lora;
          lora.r = 16;
          FTUNE_RETURN_IF_ERROR(m->AttachLora(lora));
          at::Tensor ids = at::arange(4 * 128, at::TensorOptions().dtype(at::kLong))
                               .remainder(spec.vocab)
                               .view({4, 128});
          double best = 1e9;
          for (int it = 0; it < 3; ++it) {
            const auto t0 = Clock::now();
            LossOutput out = m->Loss(ids, at::Tensor(), ids, /*training=*/true);
            out.loss_sum.backward();
            best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
            losses[prefetch] = out.loss_sum.item<double>();
          }
          FsdpUnits* u = FsdpUnitsOf(*m);
          std::printf("rank %d prefetch %d: best step %.3f s; %lld gathers (%lld prefetched), "
                      "%.1f MiB received, %.3f s in gathers\n",
                      rank, prefetch, best, static_cast<long long>(u->gathers()),
                      static_cast<long long>(u->prefetch_hits()),
                      u->gathered_bytes_total() / 1048576.0, u->gather_seconds());
        }
        RANK_EXPECT(losses[0] == losses[1], "prefetch changed the loss");
        return OkStatus();
      },
      milliseconds(600000));
  ASSERT_TRUE(AllOk(exits, kWorld)) << Report(exits);
  for (const auto& e : exits) std::printf("%s", e.output.c_str());
}

// ------------------------------------------------------------ (e) failures

// A communicator that SIGKILLs its own process when its `kill_at`-th
// collective (0-based) is called, or with another `signal` hangs there
// (sleeps 8 s, then exits 3): a rank dying or hanging at a chosen point.
class DyingCommunicator : public Communicator {
 public:
  DyingCommunicator(Communicator* inner, int kill_at, int signal = SIGKILL)
      : inner_(inner), kill_at_(kill_at), signal_(signal) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string_view backend() const override { return inner_->backend(); }
  milliseconds timeout() const override { return inner_->timeout(); }
  Status AllGather(const void* send, void* recv, size_t n, DataType t,
                   comm::StreamHandle s) override {
    Tick();
    return inner_->AllGather(send, recv, n, t, s);
  }
  Status ReduceScatter(const void* send, void* recv, size_t n, DataType t, comm::ReduceOp op,
                       comm::StreamHandle s) override {
    Tick();
    return inner_->ReduceScatter(send, recv, n, t, op, s);
  }
  Status AllReduce(const void* send, void* recv, size_t n, DataType t, comm::ReduceOp op,
                   comm::StreamHandle s) override {
    Tick();
    return inner_->AllReduce(send, recv, n, t, op, s);
  }
  Status Reduce(const void* send, void* recv, size_t n, DataType t, comm::ReduceOp op, int root,
                comm::StreamHandle s) override {
    Tick();
    return inner_->Reduce(send, recv, n, t, op, root, s);
  }
  Status Broadcast(void* buf, size_t n, DataType t, int root, comm::StreamHandle s) override {
    Tick();
    return inner_->Broadcast(buf, n, t, root, s);
  }
  Status Barrier(comm::StreamHandle s) override {
    Tick();
    return inner_->Barrier(s);
  }
  Status Synchronize(comm::StreamHandle s) override { return inner_->Synchronize(s); }

 private:
  void Tick() {
    if (calls_++ != kill_at_) return;
    if (signal_ == SIGKILL) ::raise(SIGKILL);
    // Hung: alive, sockets open, making no progress; gone well after the
    // survivors' timeout.
    std::this_thread::sleep_for(std::chrono::seconds(8));
    ::_exit(3);
  }
  Communicator* inner_;
  int kill_at_;
  int signal_;
  int calls_ = 0;
};

enum class KillPoint { kMidLoad, kHungMidLoad, kBeforeForward, kBeforeBackward, kMidForwardPrefetch };

class FsdpKillTest : public ::testing::TestWithParam<KillPoint> {};

TEST_P(FsdpKillTest, SurvivorsFailWithTheCollectivesErrorWithinTheTimeout) {
  const KillPoint point = GetParam();
  constexpr int kWorld = 3, kVictim = 1;  // the victim dies mid-load or before the forward
  const milliseconds timeout(3000);
  auto exits = RunRanks(
      kWorld,
      [&](int rank, const std::string& store) -> Status {
        std::unique_ptr<Communicator> comm;
        FTUNE_RETURN_IF_ERROR(MakeGloo(rank, kWorld, store, timeout, &comm));
        ModelOptions options = DefaultModelOptions(c10::kCPU);
        options.quantize_base = true;
        options.activation_checkpointing = true;
        const std::string dir = Golden("llama2_tiny");
        if (point == KillPoint::kMidLoad || point == KillPoint::kHungMidLoad) {
          FTUNE_RETURN_IF_ERROR(comm->Barrier(nullptr));
          // The victim dies (or hangs) at its 6th collective of the load:
          // past the layout check, inside the nested-absmax gathers of
          // layer 0. A hung rank keeps its sockets open, so only the
          // collective's timeout can end the survivors' wait.
          DyingCommunicator dying(comm.get(), rank == kVictim ? 5 : -1,
                                  point == KillPoint::kMidLoad ? SIGKILL : SIGSTOP);
          const auto t0 = Clock::now();
          auto m = LoadShardedModel(dir, options, FsdpOptions(), &dying);
          const auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - t0);
          RANK_EXPECT(!m.ok(), "LoadShardedModel succeeded without rank 1");
          const std::string msg = m.status().ToString();
          std::printf("rank %d after %lld ms: %s\n", rank, static_cast<long long>(took.count()),
                      msg.c_str());
          RANK_EXPECT(msg.find("gloo AllGather") != std::string::npos, msg);
          RANK_EXPECT(msg.find("loading '") != std::string::npos, msg);
          if (point == KillPoint::kHungMidLoad) {
            RANK_EXPECT(m.status().code() == StatusCode::kDeadlineExceeded, msg);
            RANK_EXPECT(took >= timeout - milliseconds(100), msg);
          }
          RANK_EXPECT(took < timeout + milliseconds(5000), msg);
          return OkStatus();
        }
        // kMidForwardPrefetch: the victim dies at its 18th collective, the
        // background gather of layer 0 (16 collectives load llama2_tiny: 2
        // layout checks + 14 nested absmax gathers; the 17th gathers the
        // embedding), so the survivors' failure comes out of their prefetch.
        const bool prefetch = point == KillPoint::kMidForwardPrefetch;
        DyingCommunicator dying(comm.get(), prefetch && rank == kVictim ? 17 : -1);
        FsdpOptions fsdp;
        fsdp.prefetch = prefetch;
        RANK_ASSIGN(std::unique_ptr<LlamaModel> m, LoadShardedModel(dir, options, fsdp, &dying));
        FTUNE_RETURN_IF_ERROR(m->LoadAdapter(Golden("llama2_tiny_adapter")));
        at::Tensor ids = at::arange(16, at::TensorOptions().dtype(at::kLong)).view({2, 8});
        LossOutput out;
        if (point == KillPoint::kBeforeBackward) {
          // Everyone finishes the forward; the victim dies before the
          // backward, whose first re-gather (the last layer) must fail
          // through autograd.
          out = m->Loss(ids, at::Tensor(), ids, /*training=*/true);
        }
        FTUNE_RETURN_IF_ERROR(comm->Barrier(nullptr));
        if (rank == kVictim && !prefetch) ::raise(SIGKILL);
        const auto t0 = Clock::now();
        std::string msg;
        try {
          if (point != KillPoint::kBeforeBackward) {
            out = m->Loss(ids, at::Tensor(), ids, /*training=*/true);
          }
          out.loss_sum.backward();
        } catch (const c10::Error& e) {
          msg = e.what_without_backtrace();
        }
        if (point == KillPoint::kBeforeBackward) {
          RANK_EXPECT(msg.find("FSDP gather of unit 2 (layer 1, backward)") != std::string::npos,
                      msg);
        }
        if (prefetch) {
          RANK_EXPECT(msg.find("FSDP gather of unit 1 (layer 0, forward)") != std::string::npos,
                      msg);
        }
        const auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - t0);
        std::printf("rank %d after %lld ms: %s\n", rank, static_cast<long long>(took.count()),
                    msg.c_str());
        RANK_EXPECT(!msg.empty(), "forward/backward succeeded without rank 1");
        RANK_EXPECT(msg.find("FSDP gather of unit") != std::string::npos, msg);
        RANK_EXPECT(msg.find("gloo AllGather") != std::string::npos, msg);
        RANK_EXPECT(msg.find("on rank " + std::to_string(rank) + " of 3") != std::string::npos,
                    msg);
        RANK_EXPECT(took < timeout + milliseconds(5000), msg);
        return OkStatus();
      },
      milliseconds(120000));
  ASSERT_EQ(static_cast<int>(exits.size()), kWorld) << Report(exits);
  if (point == KillPoint::kHungMidLoad) {
    EXPECT_TRUE(WIFEXITED(exits[kVictim].wait_status) && WEXITSTATUS(exits[kVictim].wait_status) == 3)
        << Report(exits);
  } else {
    EXPECT_TRUE(WIFSIGNALED(exits[kVictim].wait_status)) << Report(exits);
  }
  for (const auto& e : exits) {
    if (e.rank == kVictim) continue;
    EXPECT_TRUE(e.ok()) << Report(exits);
    EXPECT_FALSE(e.killed_by_launcher) << Report(exits);
  }
  std::printf("%s", Report(exits).c_str());
}

INSTANTIATE_TEST_SUITE_P(Points, FsdpKillTest,
                         ::testing::Values(KillPoint::kMidLoad, KillPoint::kHungMidLoad,
                                           KillPoint::kBeforeForward, KillPoint::kBeforeBackward,
                                           KillPoint::kMidForwardPrefetch),
                         [](const auto& info) {
                           switch (info.param) {
                             case KillPoint::kMidLoad: return std::string("killed_mid_load");
                             case KillPoint::kHungMidLoad: return std::string("hung_mid_load");
                             case KillPoint::kBeforeBackward:
                               return std::string("killed_before_backward");
                             case KillPoint::kMidForwardPrefetch:
                               return std::string("killed_in_a_prefetch");
                             case KillPoint::kBeforeForward: break;
                           }
                           return std::string("killed_before_forward");
                         });

// ------------------------------------------------------------ (f) offload

// Three steps (forward, backward, ReduceGradients, clipping, AdamW on the
// shard, GatherParams) with FsdpOptions::offload_params on and off, rank r
// taking rows r::W. On CPU ranks offload changes where nothing lives, only
// the path: the results must be the same bits.
class FsdpOffloadTest : public ::testing::TestWithParam<int> {};

TEST_P(FsdpOffloadTest, OffloadedLoraStateTrainsLikeTheDeviceOne) {
  const int world = GetParam();
  auto exits = RunRanks(
      world,
      [&](int rank, const std::string& store) -> Status {
        std::unique_ptr<Communicator> comm;
        FTUNE_RETURN_IF_ERROR(MakeGloo(rank, world, store, milliseconds(60000), &comm));
        Communicator* shard_comm = world == 1 ? nullptr : comm.get();  // 1 rank: none at all
        const std::string dir = Golden("llama2_tiny");
        const std::string adapter = Golden("llama2_tiny_adapter");
        ModelOptions options = DefaultModelOptions(c10::kCPU);
        options.attention = AttentionImpl::kMath;
        at::Generator gen = at::detail::createCPUGenerator(11);
        const int64_t batch = 12, seq = 16;
        at::Tensor ids = at::randint(0, 128, {batch, seq}, gen, at::TensorOptions().dtype(at::kLong));
        at::Tensor labels = ids.clone();
        labels.view(-1).slice(0, 0, labels.numel(), 7).fill_(-100);
        const double global_tokens =
            static_cast<double>(LlamaModel::CountLossTokens(labels, at::Tensor()));
        const at::Tensor my_ids = ids.slice(0, rank, batch, world);
        const at::Tensor my_labels = labels.slice(0, rank, batch, world);

        struct Run {
          std::vector<double> losses, norms;
          at::Tensor adapters, shard, exp_avg, exp_avg_sq;
        };
        auto train = [&](bool offload) -> Result<Run> {
          FsdpOptions fsdp;
          fsdp.offload_params = offload;
          RANK_ASSIGN(std::unique_ptr<LlamaModel> m,
                      LoadShardedModel(dir, options, fsdp, shard_comm));
          FTUNE_RETURN_IF_ERROR(m->LoadAdapter(adapter));
          RANK_ASSIGN(std::unique_ptr<ShardedLora> lora, ShardedLora::Create(m.get(), shard_comm));
          // The option reached ShardedLora through the units.
          RANK_EXPECT(lora->offloaded() == offload,
                      "offloaded() " + std::to_string(lora->offloaded()));
          RANK_EXPECT(lora->shard().device().is_cpu(), "shard on " + lora->shard().device().str());
          AdamWOptions adam;
          adam.lr = 1e-2;
          AdamW opt({lora->shard()}, adam);
          Run run;
          for (int step = 0; step < 3; ++step) {
            LossOutput out = m->Loss(my_ids, at::Tensor(), my_labels, /*training=*/true);
            at::Tensor loss = out.loss_sum / global_tokens;
            loss.backward();
            run.losses.push_back(loss.item<double>());
            FTUNE_RETURN_IF_ERROR(lora->ReduceGradients());
            RANK_EXPECT(lora->shard().grad().defined() && lora->shard().grad().device().is_cpu(),
                        "the shard's gradient is not on the host");
            RANK_ASSIGN(double norm, lora->GradNorm());
            RANK_ASSIGN(double clipped, lora->ClipGradNorm(norm / 2));  // clipping active
            run.norms.push_back(norm);
            run.norms.push_back(clipped);
            opt.Step(adam.lr);
            RANK_EXPECT(opt.exp_avg(0).device().is_cpu() && opt.exp_avg_sq(0).device().is_cpu(),
                        "AdamW's moments are not on the host");
            opt.ZeroGrad();
            FTUNE_RETURN_IF_ERROR(lora->GatherParams());
          }
          run.adapters = Flat(Params(*m)).clone();
          run.shard = lora->shard().detach().clone();
          run.exp_avg = opt.exp_avg(0).clone();
          run.exp_avg_sq = opt.exp_avg_sq(0).clone();
          return run;
        };
        RANK_ASSIGN(Run off, train(false));
        RANK_ASSIGN(Run on, train(true));
        RANK_EXPECT(off.losses.back() != off.losses.front(), "the steps changed nothing");
        for (size_t i = 0; i < off.losses.size(); ++i) {
          RANK_EXPECT(on.losses[i] == off.losses[i],
                      "step " + std::to_string(i) + " loss " + std::to_string(on.losses[i]) +
                          " offloaded vs " + std::to_string(off.losses[i]));
        }
        for (size_t i = 0; i < off.norms.size(); ++i) {
          RANK_EXPECT(on.norms[i] == off.norms[i],
                      "norm " + std::to_string(i) + ": " + std::to_string(on.norms[i]) +
                          " offloaded vs " + std::to_string(off.norms[i]));
        }
        RANK_EXPECT(at::equal(on.adapters, off.adapters),
                    "adapters differ by " +
                        std::to_string(testing::MaxAbsDiff(on.adapters, off.adapters)));
        RANK_EXPECT(at::equal(on.shard, off.shard), "shards differ");
        RANK_EXPECT(at::equal(on.exp_avg, off.exp_avg) && at::equal(on.exp_avg_sq, off.exp_avg_sq),
                    "AdamW moments differ");
        if (rank == 0) {
          std::printf("%d ranks, 3 steps: losses %.9g %.9g %.9g bit-equal with and without "
                      "offload, as are the adapters, shard and AdamW moments\n",
                      world, on.losses[0], on.losses[1], on.losses[2]);
        }
        return OkStatus();
      },
      milliseconds(300000));
  ASSERT_TRUE(AllOk(exits, world)) << Report(exits);
  std::printf("%s", exits[0].output.c_str());
}

INSTANTIATE_TEST_SUITE_P(Ranks, FsdpOffloadTest, ::testing::Values(1, 2, 3),
                         [](const auto& info) { return std::to_string(info.param) + "ranks"; });

}  // namespace
}  // namespace ftune::trainer
