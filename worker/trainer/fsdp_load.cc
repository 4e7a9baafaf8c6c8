// Sliced loading and quantizing of the FSDP shards; see fsdp_load.h.
#include "worker/trainer/fsdp_load.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <chrono>
#include <map>
#include <utility>
#include <vector>

#if FTUNE_FSDP_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/random_init_cuda.h"
#endif

#include "ftune/file_util.h"
#include "worker/trainer/fsdp_common.h"
#include "worker/modelio/init_model.h"
#include "worker/modelio/llama_config.h"
#include "worker/modelio/safetensors.h"
#include "worker/trainer/weights.h"

namespace ftune::trainer {
namespace {

using comm::DataType;
using internal::AllGatherBytes;
using internal::CeilDiv;
using internal::CheckSameOnEveryRank;
using internal::CommDevice;
using internal::Prefixed;
using internal::Segment;
using internal::U8;
using internal::Unit;
using internal::UnitTensor;
using internal::Where;

constexpr int64_t kNested = kernels::kNf4NestedBlocksize;

// Returns the heap's free pages to the kernel (see fsdp_load.h, "Loading").
void TrimHeap() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

// Resets the kernel's peak-RSS mark (VmHWM) to the current RSS, so the next
// reading is the peak since now. Best effort: without it, VmHWM is the peak
// since the process started, which only overstates.
void ResetPeakRss() {
  const int fd = ::open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  (void)!::write(fd, "5", 1);
  ::close(fd);
}

// Elements [e0, e1) of an init-model tensor (bf16, on options.device),
// generated where they will live: by a CUDA kernel on a GPU, by the CPU
// writer's own code on the CPU. Both give init-model's bytes.
Result<at::Tensor> RandomInitPart(const WeightSpec& spec, const ModelOptions& options,
                                  int64_t e0, int64_t e1) {
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(options.device);
  at::Tensor part = at::empty({e1 - e0}, bf16);
  if (e1 <= e0) return part;
  auto* out = reinterpret_cast<uint16_t*>(part.data_ptr());
  if (options.device.is_cuda()) {
#if FTUNE_FSDP_CUDA
    if (spec.is_norm) return part.fill_(1.0);
    c10::cuda::CUDAGuard guard(options.device);
    const kernels::Status s = kernels::FillNormalBf16Cuda(
        InitTensorKey(options.random_seed, spec.name), spec.stddev, static_cast<uint64_t>(e0),
        static_cast<uint64_t>(e1 - e0), out,
        c10::cuda::getCurrentCUDAStream(options.device.index()).stream());
    if (!s.ok()) return InternalError("random weights for '" + spec.name + "': " + s.message());
    return part;
#else
    return FailedPreconditionError("random weights on " + options.device.str() +
                              ": this ftune-rank was built without CUDA kernels");
#endif
  }
  FillInitWeight(spec, options.random_seed, static_cast<uint64_t>(e0), static_cast<uint64_t>(e1),
                 out, /*num_threads=*/0);
  return part;
}

// A dense base layer whose weight the engine sets and drops (the FSDP form
// of DenseLinear: same checks, same at::linear).
class ShardedDenseLinear final : public BaseLinear {
 public:
  ShardedDenseLinear(int64_t out, int64_t in) : out_(out), in_(in) {}
  int64_t in_features() const override { return in_; }
  int64_t out_features() const override { return out_; }
  at::Tensor Forward(const at::Tensor& x) const override {
    TORCH_CHECK(weight_.defined(), "dense base layer (", out_, ", ", in_,
                "): weight not resident (an FSDP unit used without being gathered)");
    TORCH_CHECK(x.size(-1) == in_, "DenseLinear: input ", x.sizes(),
                " does not match weight (out, in) = ", weight_.sizes());
    TORCH_CHECK(x.scalar_type() == weight_.scalar_type(), "DenseLinear: input dtype ",
                x.scalar_type(), " differs from the weight's ", weight_.scalar_type());
    return at::linear(x, weight_);  // (..., out)
  }
  at::Tensor DenseWeight(c10::ScalarType dtype) const override {
    TORCH_CHECK(weight_.defined(), "dense base layer (", out_, ", ", in_,
                "): weight not resident (an FSDP unit used without being gathered)");
    return weight_.to(dtype);
  }
  at::Tensor* mutable_weight() { return &weight_; }

 private:
  int64_t out_, in_;
  at::Tensor weight_;  // (out, in), a view into the gathered unit
};

}  // namespace

// ------------------------------------------------------------ NF4 pieces

Result<Nf4ShardPieces> QuantizeNf4Part(const at::Tensor& part, const Nf4ShardGeometry& g,
                                       int rank, comm::Communicator* comm,
                                       const std::string& name) {
  const int world = comm == nullptr ? 1 : comm->size();
  if (world != g.world) {
    return InvalidArgumentError("QuantizeNf4Part('" + name + "'): geometry for " +
                                std::to_string(g.world) + " ranks but the communicator has " +
                                std::to_string(world));
  }
  const int64_t count = g.ElementEnd(rank) - g.ElementBegin(rank);
  if (part.dim() != 1 || part.numel() != count) {
    return InvalidArgumentError("QuantizeNf4Part('" + name + "'): " + Where(rank, world) +
                                " owns " + std::to_string(count) + " elements, got a tensor of " +
                                std::to_string(part.numel()) + " (dim " +
                                std::to_string(part.dim()) + ")");
  }
  const c10::Device dev = part.device();
  Nf4ShardPieces p;
  p.packed = at::zeros({g.PackedPieceBytes()}, U8(dev));
  at::Tensor absmax = at::zeros({g.blocks_per_rank}, at::TensorOptions().dtype(at::kFloat).device(dev));
  if (count > 0) {
    Nf4Options plain;
    plain.blocksize = g.blocksize;
    plain.double_quant = false;
    // The part's blocks are whole blocks of the tensor (only the tensor's
    // last block may be partial, and it is the last of the last non-empty
    // part), so quantizing them alone gives the tensor's bytes.
    Nf4Weight w = QuantizeNf4Weight(part.reshape({1, count}), plain);
    p.packed.narrow(0, 0, w.packed.numel()).copy_(w.packed);
    absmax.narrow(0, 0, w.absmax.numel()).copy_(w.absmax);
  }
  if (!g.nested) {
    p.absmax = absmax.view(at::kByte);
    return p;
  }
  // The nested offset is a mean over the whole tensor in torch's reduction
  // order: gather every rank's absmax and double-quantize the whole vector
  // here, as every other rank does, then keep this rank's slice.
  at::Tensor whole;
  if (world == 1) {
    whole = absmax.narrow(0, 0, g.num_blocks);
  } else {
    const c10::Device cdev = CommDevice(comm, dev);
    at::Tensor send = absmax.to(cdev);
    at::Tensor all = at::empty({g.blocks_per_rank * world}, send.options());
    const Status s = comm->AllGather(send.data_ptr(), all.data_ptr(),
                                     static_cast<size_t>(g.blocks_per_rank), DataType::kFloat32,
                                     nullptr);
    if (!s.ok()) {
      return Prefixed(s, "gathering the block absmax of '" + name + "' on " + Where(rank, world));
    }
    whole = all.narrow(0, 0, g.num_blocks).to(dev);
  }
  Nf4NestedStats st = DoubleQuantizeNf4Absmax(whole);
  p.absmax = at::zeros({g.AbsmaxPieceBytes()}, U8(dev));
  at::Tensor absmax2 = at::zeros({g.blocks_per_rank / kNested}, absmax.options());
  const int64_t b0 = g.BlockBegin(rank), b1 = g.BlockEnd(rank);
  if (b1 > b0) {
    p.absmax.narrow(0, 0, b1 - b0).copy_(st.qabsmax.narrow(0, b0, b1 - b0));
    const int64_t n0 = b0 / kNested, n1 = CeilDiv(b1, kNested);
    absmax2.narrow(0, 0, n1 - n0).copy_(st.absmax2.narrow(0, n0, n1 - n0));
  }
  p.absmax2 = absmax2.view(at::kByte);
  p.offset = st.offset;
  return p;
}

Result<Nf4Weight> GatherNf4Pieces(const Nf4ShardPieces& mine, const Nf4ShardGeometry& g,
                                  int64_t out_features, int64_t in_features,
                                  comm::Communicator* comm) {
  if (out_features * in_features != g.numel) {
    return InvalidArgumentError("GatherNf4Pieces: (" + std::to_string(out_features) + ", " +
                                std::to_string(in_features) + ") is not " +
                                std::to_string(g.numel) + " elements");
  }
  const c10::Device dev = mine.packed.device();
  const c10::Device cdev = CommDevice(comm, dev);
  auto gather = [&](const at::Tensor& piece, int64_t bytes) -> Result<at::Tensor> {
    at::Tensor send = piece.to(cdev).contiguous();
    at::Tensor all = at::empty({bytes * g.world}, U8(cdev));
    FTUNE_RETURN_IF_ERROR(AllGatherBytes(comm, send, all, bytes, 0, 0));
    return all.to(dev);
  };
  Nf4Weight w;
  w.out_features = out_features;
  w.in_features = in_features;
  w.blocksize = g.blocksize;
  FTUNE_ASSIGN_OR_RETURN(at::Tensor packed, gather(mine.packed, g.PackedPieceBytes()));
  w.packed = packed.narrow(0, 0, kernels::Nf4PackedBytes(g.numel)).clone();
  FTUNE_ASSIGN_OR_RETURN(at::Tensor absmax, gather(mine.absmax, g.AbsmaxPieceBytes()));
  if (g.nested) {
    w.absmax = absmax.narrow(0, 0, g.num_blocks).clone();
    FTUNE_ASSIGN_OR_RETURN(at::Tensor a2, gather(mine.absmax2, g.Absmax2PieceBytes()));
    w.nested_absmax =
        a2.view(at::kFloat).narrow(0, 0, kernels::Nf4NumNestedBlocks(g.num_blocks)).clone();
    w.offset = mine.offset.clone();
  } else {
    w.absmax = absmax.view(at::kFloat).narrow(0, 0, g.num_blocks).clone();
  }
  w.Validate();
  return w;
}

// ------------------------------------------------------------ loading

Result<std::unique_ptr<LlamaModel>> LoadShardedModel(const std::string& model_dir,
                                                    const ModelOptions& options,
                                                    const FsdpOptions& fsdp,
                                                    comm::Communicator* comm, LoadStats* stats) {
  const auto t0 = std::chrono::steady_clock::now();
  ResetPeakRss();
  LoadStats local;
  local.start_rss_bytes = CurrentRssBytes();
  const int world = comm == nullptr ? 1 : comm->size();
  const int rank = comm == nullptr ? 0 : comm->rank();
  if (comm != nullptr && comm->backend() == "nccl" && !options.device.is_cuda()) {
    return InvalidArgumentError("LoadShardedModel: an NCCL communicator needs a CUDA model device, "
                                "got " + options.device.str());
  }
  FTUNE_ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig(model_dir));
  // The weights come from the safetensors files, or are generated (random).
  std::unique_ptr<SafetensorsModel> st;
  std::map<std::string, WeightSpec> random_specs;
  std::string source;
  if (options.random_weights) {
    for (WeightSpec& w : LlamaWeightSpecs(config)) random_specs[w.name] = std::move(w);
    source = model_dir + "/config.json (random weights, seed " +
             std::to_string(options.random_seed) + ")";
  } else {
    FTUNE_ASSIGN_OR_RETURN(st, SafetensorsModel::OpenDirectory(model_dir));
    source = st->source();
  }

  // The model with no frozen bytes; the projections' layers are remembered
  // by name so their units can point at them.
  std::map<std::string, BaseLinear*> bases;
  auto make_base = [&](const std::string& name, int64_t out,
                       int64_t in) -> Result<std::unique_ptr<BaseLinear>> {
    std::unique_ptr<BaseLinear> b;
    if (options.quantize_base) {
      b = Nf4Linear::Unmaterialized(out, in, options.nf4);
    } else {
      b = std::make_unique<ShardedDenseLinear>(out, in);
    }
    bases[name] = b.get();
    return b;
  };
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model,
                                 LlamaModel::BuildUnmaterialized(config, options, source,
                                                                 make_base));
  const c10::Device cdev = CommDevice(comm, options.device);
  // Where shards live: pinned host memory when offloading from a GPU, else
  // where the communicator reads.
  const bool pin = fsdp.offload_params && options.device.is_cuda();
  const c10::Device shard_device = fsdp.offload_params ? c10::Device(c10::DeviceType::CPU) : cdev;

  // This rank's elements [e0, e1) of a tensor, in the compute dtype on the
  // device; checks the file's shape against the config.
  auto read_part = [&](const UnitTensor& t, int64_t e0, int64_t e1) -> Result<at::Tensor> {
    if (options.random_weights) {
      auto it = random_specs.find(t.name);
      if (it == random_specs.end()) {
        return InternalError("random weights: no init spec for '" + t.name + "'");
      }
      FTUNE_ASSIGN_OR_RETURN(at::Tensor part,
                                     RandomInitPart(it->second, options, e0, e1));
      return part.to(options.dtype);
    }
    FTUNE_ASSIGN_OR_RETURN(SafetensorsModel::TensorRef ref, st->Find(t.name));
    std::vector<int64_t> file_shape(ref.info->shape.begin(), ref.info->shape.end());
    if (file_shape != t.shape) {
      return InvalidArgumentError(ref.file->path() + ": tensor '" + t.name + "' has shape " +
                                  ShapeToString(ref.info->shape) +
                                  " but the config implies " +
                                  ShapeToString(std::vector<uint64_t>(t.shape.begin(), t.shape.end())));
    }
    FTUNE_ASSIGN_OR_RETURN(c10::ScalarType file_dtype, TorchDtypeOf(ref.info->dtype));
    at::Tensor raw = at::empty({e1 - e0}, at::TensorOptions().dtype(file_dtype));
    if (e1 > e0) {
      FTUNE_RETURN_IF_ERROR(ref.file->ReadElements(t.name, e0, e1, raw.data_ptr()));
      local.read_bytes += raw.numel() * static_cast<int64_t>(raw.element_size());
    }
    return raw.to(at::TensorOptions().dtype(options.dtype).device(options.device));
  };

  auto dense = [&](const std::string& name, std::vector<int64_t> shape,
                   std::vector<at::Tensor*> targets) {
    UnitTensor t;
    t.name = name;
    t.shape = std::move(shape);
    t.numel = 1;
    for (int64_t d : t.shape) t.numel *= d;
    t.targets = std::move(targets);
    return t;
  };
  const int64_t h = config.hidden_size;
  std::vector<Unit> list(model->num_units());
  {
    Unit& u = list[LlamaModel::kEmbeddingUnit];
    u.name = "embedding";
    std::vector<at::Tensor*> targets = {&model->mutable_embed_tokens()};
    if (config.tie_word_embeddings) targets.push_back(&model->mutable_lm_head());
    u.tensors.push_back(dense("model.embed_tokens.weight", {config.vocab_size, h}, targets));
  }
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    Unit& u = list[LlamaModel::LayerUnit(i)];
    u.name = "layer " + std::to_string(i);
    DecoderLayer& l = model->mutable_layers()[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    u.tensors.push_back(dense(p + "input_layernorm.weight", {h}, {&l.input_layernorm}));
    u.tensors.push_back(
        dense(p + "post_attention_layernorm.weight", {h}, {&l.post_attention_layernorm}));
    for (const char* name : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                             "mlp.down_proj"}) {
      const std::string wname = p + name + ".weight";
      BaseLinear* b = bases.at(wname);
      std::vector<int64_t> shape = {b->out_features(), b->in_features()};
      if (options.quantize_base) {
        UnitTensor t;
        t.name = wname;
        t.shape = shape;
        t.numel = shape[0] * shape[1];
        t.nf4 = true;
        t.geo = Nf4ShardGeometry::Make(t.numel, options.nf4, world);
        t.linear = static_cast<Nf4Linear*>(b);
        u.tensors.push_back(std::move(t));
      } else {
        u.tensors.push_back(dense(wname, shape, {static_cast<ShardedDenseLinear*>(b)->mutable_weight()}));
      }
    }
    if (config.has_qkv_bias()) {
      // Qwen2's biases: dense elements of the layer's unit, never quantized.
      for (const auto& [name, m] : {std::pair<const char*, LoraLinear*>{"self_attn.q_proj.bias",
                                                                        l.q_proj.get()},
                                    {"self_attn.k_proj.bias", l.k_proj.get()},
                                    {"self_attn.v_proj.bias", l.v_proj.get()}}) {
        u.tensors.push_back(dense(p + name, {m->out_features()}, {&m->mutable_bias()}));
      }
    }
  }
  {
    Unit& u = list[model->head_unit()];
    u.name = "head";
    u.tensors.push_back(dense("model.norm.weight", {h}, {&model->mutable_final_norm()}));
    if (!config.tie_word_embeddings) {
      u.tensors.push_back(
          dense("lm_head.weight", {config.vocab_size, h}, {&model->mutable_lm_head()}));
    }
  }

  const int64_t esize = c10::elementSize(options.dtype);
  for (Unit& u : list) internal::LayoutUnit(u, world, options.dtype);
  {
    // Every rank must lay out the same units: a rank given another model or
    // other options would otherwise run mismatched collectives.
    std::vector<int64_t> mine = {static_cast<int64_t>(list.size()),
                                 static_cast<int64_t>(options.dtype), options.quantize_base,
                                 options.nf4.blocksize, options.nf4.double_quant};
    for (const Unit& u : list) mine.push_back(u.shard_bytes);
    FTUNE_RETURN_IF_ERROR(CheckSameOnEveryRank(
        comm, options.device, mine, "LoadShardedModel(" + source + "): the model layout"));
  }
  for (Unit& u : list) {
    u.shard = at::zeros({u.shard_bytes}, U8(shard_device).pinned_memory(pin));
    for (UnitTensor& t : u.tensors) {
      local.largest_tensor_bytes = std::max(local.largest_tensor_bytes, t.numel * esize);
      const std::string what = "loading '" + t.name + "' (" + source + ") on " + Where(rank, world);
      if (t.nf4) {
        const int64_t e0 = t.geo.ElementBegin(rank), e1 = t.geo.ElementEnd(rank);
        FTUNE_ASSIGN_OR_RETURN(at::Tensor part, read_part(t, e0, e1));
        Result<Nf4ShardPieces> pieces = QuantizeNf4Part(part, t.geo, rank, comm, t.name);
        if (!pieces.ok()) return Prefixed(pieces.status(), what);
        part = at::Tensor();
        auto put = [&](int seg, const at::Tensor& bytes) {
          const Segment& s = u.segments[seg];
          u.shard.narrow(0, s.shard_offset, s.piece_bytes).copy_(bytes);
        };
        put(t.seg_packed, pieces->packed);
        put(t.seg_absmax, pieces->absmax);
        if (t.geo.nested) {
          put(t.seg_absmax2, pieces->absmax2);
          t.offset = pieces->offset.to(options.device);
        }
      } else {
        const int64_t piece = CeilDiv(t.numel, world);
        const int64_t e0 = std::min(t.numel, rank * piece);
        const int64_t e1 = std::min(t.numel, (rank + 1) * piece);
        FTUNE_ASSIGN_OR_RETURN(at::Tensor part, read_part(t, e0, e1));
        const Segment& s = u.segments[t.seg_dense];
        if (e1 > e0) {
          u.shard.narrow(0, s.shard_offset, (e1 - e0) * esize).copy_(part.view(at::kByte));
        }
      }
      TrimHeap();
    }
    local.shard_bytes += u.shard_bytes;
  }
  local.unit_count = static_cast<int64_t>(list.size());
  model->set_unit_hooks(internal::MakeFsdpUnits(model.get(), comm, fsdp,
                                                config.tie_word_embeddings, std::move(list)));
  local.peak_rss_bytes = PeakRssBytes();
  local.end_rss_bytes = CurrentRssBytes();
  local.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (stats != nullptr) *stats = local;
  return model;
}

}  // namespace ftune::trainer
