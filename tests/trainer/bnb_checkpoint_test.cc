// bitsandbytes 4-bit checkpoints: the Linear4bit layout ftune-rank quantize
// writes, and loading such a directory back.
//
// The round trip must give the model that ModelOptions::quantize_base builds
// from the dense directory, bit for bit (same bytes, same kernels), so a
// pre-quantized checkpoint trains exactly like quantizing at load time.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <dirent.h>
#include <ftw.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "model_test_util.h"
#include "worker/trainer/bnb_checkpoint.h"
#include "ftune/file_util.h"
#include "worker/modelio/safetensors.h"
#include "worker/trainer/weights.h"
#include "temp_dir.h"

namespace ftune::trainer {
namespace {

using json = nlohmann::json;
using testing::ComputeLossAndGrads;
using testing::GoldenDir;
using testing::GoldenFile;
using testing::LossAndGrads;

// A fresh directory under $TMPDIR, removed with everything in it (POSIX
// nftw: no std::filesystem next to the pip LibTorch, torch_compat.h).
class TempDir : public testutil::TempDir {
 public:
  TempDir() : testutil::TempDir("bnb_checkpoint_test") {}
};

std::vector<std::string> ListFiles(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

void CopyDir(const std::string& from, const std::string& to) {
  for (const std::string& f : ListFiles(from)) {
    auto bytes = ReadFileToString(from + "/" + f, 1ull << 30);
    ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
    ASSERT_TRUE(WriteFileAtomically(to + "/" + f, *bytes).ok());
  }
}

TEST(BnbCheckpointTest, PythonFloatRepr) {
  EXPECT_EQ(PythonFloatRepr(0.5), "0.5");
  EXPECT_EQ(PythonFloatRepr(-0.0), "-0.0");
  EXPECT_EQ(PythonFloatRepr(123.0), "123.0");
  EXPECT_EQ(PythonFloatRepr(1e-05), "1e-05");
  EXPECT_EQ(PythonFloatRepr(0.0001), "0.0001");
  EXPECT_EQ(PythonFloatRepr(1.5e-5), "1.5e-05");
  EXPECT_EQ(PythonFloatRepr(1e16), "1e+16");
  EXPECT_EQ(PythonFloatRepr(1e15), "1000000000000000.0");
  EXPECT_EQ(PythonFloatRepr(123456.789), "123456.789");
  // A float32 offset as torch's .item() hands it to json.dumps.
  EXPECT_EQ(PythonFloatRepr(static_cast<double>(0.1f)), "0.10000000149011612");
  EXPECT_EQ(PythonFloatRepr(static_cast<double>(0.0123f)), "0.012299999594688416");
  EXPECT_EQ(PythonFloatRepr(-2.5e-7), "-2.5e-07");
}

TEST(BnbCheckpointTest, QuantizedProjectionNames) {
  EXPECT_TRUE(IsQuantizedProjection("model.layers.0.self_attn.q_proj.weight"));
  EXPECT_TRUE(IsQuantizedProjection("model.layers.31.mlp.down_proj.weight"));
  EXPECT_FALSE(IsQuantizedProjection("model.layers.0.self_attn.q_proj.bias"));
  EXPECT_FALSE(IsQuantizedProjection("model.layers.0.input_layernorm.weight"));
  EXPECT_FALSE(IsQuantizedProjection("model.embed_tokens.weight"));
  EXPECT_FALSE(IsQuantizedProjection("lm_head.weight"));
}

TEST(BnbCheckpointTest, StateDictLayoutAndJson) {
  at::Tensor dense = at::linspace(-1, 1, 64 * 32).view({32, 64});
  const Nf4Weight w = QuantizeNf4Weight(dense, {});
  auto sd = Nf4StateDict("model.layers.0.self_attn.k_proj.weight", w, at::kBFloat16);
  std::map<std::string, at::Tensor> m(sd.begin(), sd.end());
  ASSERT_EQ(m.size(), 6u);
  const std::string p = "model.layers.0.self_attn.k_proj.weight";
  EXPECT_EQ(m[p].sizes(), (std::vector<int64_t>{1024, 1}));
  EXPECT_EQ(m[p].scalar_type(), at::kByte);
  EXPECT_EQ(m[p + ".absmax"].scalar_type(), at::kByte);
  EXPECT_EQ(m[p + ".absmax"].numel(), 32);
  EXPECT_EQ(m[p + ".quant_map"].numel(), 16);
  EXPECT_EQ(m[p + ".quant_map"][15].item<float>(), 1.0f);
  EXPECT_EQ(m[p + ".nested_absmax"].numel(), 1);
  EXPECT_EQ(m[p + ".nested_quant_map"].numel(), 256);
  const at::Tensor qs = m[p + ".quant_state.bitsandbytes__nf4"];
  const std::string text(static_cast<const char*>(qs.data_ptr()), qs.numel());
  EXPECT_EQ(text, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", "
                  "\"shape\": [32, 64], \"nested_blocksize\": 256, \"nested_dtype\": "
                  "\"float32\", \"nested_offset\": " +
                      PythonFloatRepr(w.offset.item<float>()) + "}");

  // And back, through the same lookup a checkpoint reader uses.
  RawTensorLookup lookup = [&](const std::string& n) -> Result<at::Tensor> {
    auto it = m.find(n);
    if (it == m.end()) return NotFoundError("no tensor '" + n + "'");
    return it->second;
  };
  auto back = Nf4WeightFromStateDict(p, lookup, "mem");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_TRUE(at::equal(DequantizeNf4Weight(*back, at::kFloat), DequantizeNf4Weight(w, at::kFloat)));

  // What cannot be reproduced exactly is refused, naming the tensor.
  auto broken = m;
  broken[p + ".quant_map"] = m[p + ".quant_map"].clone();
  broken[p + ".quant_map"][3] = 0.25f;
  RawTensorLookup bad_map = [&](const std::string& n) -> Result<at::Tensor> {
    auto it = broken.find(n);
    if (it == broken.end()) return NotFoundError("no tensor '" + n + "'");
    return it->second;
  };
  auto r = Nf4WeightFromStateDict(p, bad_map, "mem");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("quant_map"), std::string::npos) << r.status().ToString();
  broken = m;
  broken.erase(p + ".nested_absmax");
  r = Nf4WeightFromStateDict(p, bad_map, "mem");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  broken = m;
  broken[p] = m[p].slice(0, 0, 1000);
  r = Nf4WeightFromStateDict(p, bad_map, "mem");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("1000 bytes but shape [32, 64] needs 1024"), std::string::npos)
      << r.status().ToString();
}

class BnbRoundTripTest : public ::testing::TestWithParam<std::string> {};

TEST_P(BnbRoundTripTest, QuantizeLoadEqualsQuantizeAtLoad) {
  const std::string src = GoldenDir() + "/" + GetParam();
  TempDir tmp;
  const std::string in = tmp.path() + "/in", out = tmp.path() + "/out";
  ASSERT_EQ(mkdir(in.c_str(), 0755), 0);
  CopyDir(src, in);
  // A tokenizer file travels along.
  ASSERT_TRUE(WriteFileAtomically(in + "/tokenizer.json", "{\"model\": {}}\n").ok());

  QuantizeModelOptions qo;
  qo.compute_dtype = "float32";
  Status s = QuantizeModelDirectory(in, out, qo);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(ListFiles(out),
            (std::vector<std::string>{"config.json", "model.safetensors", "tokenizer.json"}));
  EXPECT_EQ(*ReadFileToString(out + "/tokenizer.json", 1 << 20), "{\"model\": {}}\n");

  // config.json: transformers' BitsAndBytesConfig for nf4 + double quant.
  json config = json::parse(*ReadFileToString(out + "/config.json", 1 << 20));
  const json& q = config.at("quantization_config");
  EXPECT_EQ(q.at("quant_method"), "bitsandbytes");
  EXPECT_EQ(q.at("load_in_4bit"), true);
  EXPECT_EQ(q.at("load_in_8bit"), false);
  EXPECT_EQ(q.at("bnb_4bit_quant_type"), "nf4");
  EXPECT_EQ(q.at("bnb_4bit_use_double_quant"), true);
  EXPECT_EQ(q.at("bnb_4bit_compute_dtype"), "float32");
  EXPECT_EQ(q.at("bnb_4bit_quant_storage"), "uint8");
  EXPECT_EQ(config.at("hidden_size"), 64);  // the rest as it was

  // Tensors: every projection as 6 Linear4bit entries, the rest byte-identical.
  auto dense = SafetensorsModel::OpenDirectory(in);
  auto quant = SafetensorsFile::Open(out + "/model.safetensors");
  ASSERT_TRUE(dense.ok() && quant.ok());
  EXPECT_EQ((*quant)->metadata().at("format"), "pt");
  const auto& c = *LoadLlamaConfig(in);
  EXPECT_EQ((*quant)->tensors().size(), (*dense)->num_tensors() + 7 * 5 * c.num_hidden_layers);
  for (const std::string& name : (*dense)->TensorNames()) {
    if (IsQuantizedProjection(name)) continue;
    auto a = (*dense)->Data(name);
    auto b = (*quant)->Data(name);
    ASSERT_TRUE(a.ok() && b.ok()) << name;
    ASSERT_EQ(a->size, b->size) << name;
    EXPECT_EQ(std::memcmp(a->data, b->data, a->size), 0) << name;
  }
  const std::string p = "model.layers.1.mlp.down_proj.weight";  // (h, inter)
  const int64_t n = c.hidden_size * c.intermediate_size, nb = n / 64;
  auto info = [&](const std::string& k) { return *(*quant)->Info(k); };
  EXPECT_EQ(info(p)->dtype, Dtype::kU8);
  EXPECT_EQ(info(p)->shape, (std::vector<uint64_t>{static_cast<uint64_t>(n / 2), 1}));
  EXPECT_EQ(info(p + ".absmax")->dtype, Dtype::kU8);
  EXPECT_EQ(info(p + ".absmax")->shape, (std::vector<uint64_t>{static_cast<uint64_t>(nb)}));
  EXPECT_EQ(info(p + ".quant_map")->dtype, Dtype::kF32);
  EXPECT_EQ(info(p + ".nested_absmax")->shape, (std::vector<uint64_t>{1}));
  EXPECT_EQ(info(p + ".nested_quant_map")->shape, (std::vector<uint64_t>{256}));
  auto qs = ReadTensorAsStored(**quant, p + ".quant_state.bitsandbytes__nf4");
  ASSERT_TRUE(qs.ok());
  const std::string text(static_cast<const char*>(qs->data_ptr()), qs->numel());
  const std::string want_prefix =
      "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [" +
      std::to_string(c.hidden_size) + ", " + std::to_string(c.intermediate_size) +
      "], \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": ";
  EXPECT_EQ(text.substr(0, want_prefix.size()), want_prefix) << text;

  // Loading it back: detection, NF4 layers from the saved bytes, and the very
  // model quantize_base builds from the dense directory.
  ASSERT_TRUE(*IsBnb4bitDirectory(out));
  ASSERT_FALSE(*IsBnb4bitDirectory(in));
  auto loaded = LoadModelDirectory(out, DefaultModelOptions(c10::kCPU));
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  ModelOptions o = DefaultModelOptions(c10::kCPU);
  o.quantize_base = true;
  auto at_load = LlamaModel::Load(in, o);
  ASSERT_TRUE(at_load.ok());
  for (size_t i = 0; i < (*loaded)->layers().size(); ++i) {
    for (const std::string& m : LoraConfig::DefaultTargetModules()) {
      const auto* a = dynamic_cast<const Nf4Linear*>(&(*loaded)->layers()[i].Module(m)->base());
      const auto* b = dynamic_cast<const Nf4Linear*>(&(*at_load)->layers()[i].Module(m)->base());
      ASSERT_TRUE(a != nullptr && b != nullptr) << m;
      EXPECT_TRUE(at::equal(a->weight().packed, b->weight().packed)) << i << " " << m;
      EXPECT_TRUE(at::equal(a->weight().absmax, b->weight().absmax)) << i << " " << m;
      EXPECT_TRUE(at::equal(a->weight().nested_absmax, b->weight().nested_absmax));
      EXPECT_TRUE(at::equal(a->weight().offset, b->weight().offset));
    }
  }
  GoldenFile golden(GetParam());
  const at::Tensor ids = golden.Get("p.input_ids"), pos = golden.Get("p.position_ids");
  ASSERT_TRUE((*loaded)->LoadAdapter(src + "_adapter").ok());
  ASSERT_TRUE((*at_load)->LoadAdapter(src + "_adapter").ok());
  {
    c10::NoGradGuard no_grad;
    EXPECT_TRUE(at::equal((*loaded)->Logits(ids, pos), (*at_load)->Logits(ids, pos)));
  }
  LossAndGrads a = ComputeLossAndGrads(**loaded, ids, pos, golden.Get("p.labels"));
  LossAndGrads b = ComputeLossAndGrads(**at_load, ids, pos, golden.Get("p.labels"));
  EXPECT_EQ(a.loss, b.loss);
  for (const auto& [name, g] : a.grads) EXPECT_TRUE(at::equal(g, b.grads.at(name))) << name;

  // A quantized directory is not quantized twice.
  Status again = QuantizeModelDirectory(out, tmp.path() + "/again", qo);
  EXPECT_EQ(again.code(), StatusCode::kInvalidArgument) << again.ToString();
}

TEST_P(BnbRoundTripTest, WithoutDoubleQuant) {
  const std::string src = GoldenDir() + "/" + GetParam();
  TempDir tmp;
  QuantizeModelOptions qo;
  qo.nf4.double_quant = false;
  ASSERT_TRUE(QuantizeModelDirectory(src, tmp.path() + "/out", qo).ok());
  auto quant = SafetensorsFile::Open(tmp.path() + "/out/model.safetensors");
  ASSERT_TRUE(quant.ok());
  const std::string p = "model.layers.0.self_attn.q_proj.weight";
  EXPECT_EQ((*quant)->Info(p + ".absmax").value()->dtype, Dtype::kF32);
  EXPECT_EQ((*quant)->Find(p + ".nested_absmax"), nullptr);
  auto qs = ReadTensorAsStored(**quant, p + ".quant_state.bitsandbytes__nf4");
  EXPECT_EQ(std::string(static_cast<const char*>(qs->data_ptr()), qs->numel()),
            "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [64, 64]}");
  ModelOptions o = DefaultModelOptions(c10::kCPU);
  auto loaded = LoadModelDirectory(tmp.path() + "/out", o);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  o.quantize_base = true;
  o.nf4.double_quant = false;
  auto at_load = LlamaModel::Load(src, o);
  GoldenFile golden(GetParam());
  c10::NoGradGuard no_grad;
  const at::Tensor ids = golden.Get("a.input_ids");
  EXPECT_TRUE(at::equal((*loaded)->Logits(ids, at::Tensor()), (*at_load)->Logits(ids, at::Tensor())));
}

INSTANTIATE_TEST_SUITE_P(Golden, BnbRoundTripTest,
                         ::testing::Values("llama3_tiny", "llama2_tiny", "qwen2_tiny"));

// bitsandbytes' own 4-bit save of the Qwen2 golden model (transformers
// from_pretrained with load_in_4bit, nf4, double quant, fp32 compute on CUDA,
// then save_pretrained; made by tests/golden/model/make_golden.py --bnb):
// ftune's quantize writes every tensor with the same bytes, the unquantized
// q/k/v biases included, and the model loaded from bitsandbytes' directory
// computes the logits bitsandbytes computed.
TEST(BnbCheckpointTest, BitsandbytesOwnSaveOfQwen2IsFtunesQuantize) {
  const std::string theirs_dir = GoldenDir() + "/qwen2_tiny_bnb4";
  TempDir tmp;
  QuantizeModelOptions qo;
  qo.compute_dtype = "float32";
  Status s = QuantizeModelDirectory(GoldenDir() + "/qwen2_tiny", tmp.path() + "/q", qo);
  ASSERT_TRUE(s.ok()) << s.ToString();
  auto theirs = SafetensorsFile::Open(theirs_dir + "/model.safetensors");
  auto ours = SafetensorsFile::Open(tmp.path() + "/q/model.safetensors");
  ASSERT_TRUE(theirs.ok() && ours.ok());
  ASSERT_EQ((*theirs)->tensors().size(), (*ours)->tensors().size());
  int biases = 0;
  for (const TensorInfo& t : (*theirs)->tensors()) {
    const TensorInfo* o = (*ours)->Info(t.name).ok() ? *(*ours)->Info(t.name) : nullptr;
    ASSERT_NE(o, nullptr) << "ftune's quantize lacks '" << t.name << "'";
    EXPECT_EQ(o->dtype, t.dtype) << t.name;
    EXPECT_EQ(o->shape, t.shape) << t.name;
    auto a = (*theirs)->Data(t.name);
    auto b = (*ours)->Data(t.name);
    ASSERT_TRUE(a.ok() && b.ok()) << t.name;
    ASSERT_EQ(a->size, b->size) << t.name;
    EXPECT_EQ(std::memcmp(a->data, b->data, a->size), 0)
        << t.name << ": "
        << (t.name.find("quant_state") != std::string::npos
                ? std::string(reinterpret_cast<const char*>(a->data), a->size) + " vs " +
                      std::string(reinterpret_cast<const char*>(b->data), b->size)
                : std::string("bytes differ"));
    if (t.name.size() > 5 && t.name.compare(t.name.size() - 5, 5, ".bias") == 0) ++biases;
  }
  EXPECT_EQ(biases, 3 * 2);
  ASSERT_TRUE(*IsBnb4bitDirectory(theirs_dir));
  auto loaded = LoadModelDirectory(theirs_dir, DefaultModelOptions(c10::kCPU));
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  GoldenFile golden("qwen2_tiny");
  GoldenFile bnb("qwen2_tiny_bnb4");
  c10::NoGradGuard no_grad;
  const at::Tensor got = (*loaded)->Logits(golden.Get("a.input_ids"), at::Tensor());
  const double diff = testing::MaxAbsDiff(got, bnb.Get("a.bnb_logits"));
  std::printf("PARITY qwen2_tiny bitsandbytes 4-bit logits max-abs %.3g\n", diff);
  EXPECT_LT(diff, 1e-4);
}

TEST(BnbCheckpointTest, RefusesOtherQuantizations) {
  TempDir tmp;
  auto write_config = [&](const json& q) {
    json config = json::parse(*ReadFileToString(GoldenDir() + "/llama3_tiny/config.json", 1 << 20));
    config["quantization_config"] = q;
    ASSERT_TRUE(WriteFileAtomically(tmp.path() + "/config.json", config.dump(2)).ok());
  };
  write_config({{"quant_method", "bitsandbytes"}, {"load_in_4bit", true}, {"bnb_4bit_quant_type", "fp4"}});
  auto r = IsBnb4bitDirectory(tmp.path());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("'fp4'"), std::string::npos) << r.status().ToString();
  write_config({{"quant_method", "bitsandbytes"}, {"load_in_8bit", true}});
  EXPECT_FALSE(IsBnb4bitDirectory(tmp.path()).ok());
  write_config({{"quant_method", "gptq"}, {"bits", 4}});
  r = IsBnb4bitDirectory(tmp.path());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("'gptq'"), std::string::npos);
  EXPECT_FALSE(LoadModelDirectory(tmp.path(), DefaultModelOptions(c10::kCPU)).ok());
}

}  // namespace
}  // namespace ftune::trainer
