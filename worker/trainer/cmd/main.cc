// ftune-rank: the rank engine's command line. Only flag parsing and process
// plumbing live here; each command is a library function (train.h, score.h,
// merge.h, bnb_checkpoint.h) so tests can call it without a process.
//
//   ftune-rank train --spec job.yaml [--nproc N] [--device cpu|cuda]
//                    [--output-dir DIR] [--resume-from CKPT|auto] [--json]
//       A standalone fine-tune: N local ranks (forked, Gloo on CPU, NCCL on
//       GPUs 0..N-1), events printed to stderr, a JSON summary on stdout.
//   ftune-rank run --channel-fd FD --spec FILE --job-id ID --attempt N
//                  --rank R --world-size W --device DEV --output-dir DIR
//                  [--resume-from CKPT]
//       One rank launched by ftune-agent (docs/control-plane.md): events on
//       the channel, rendezvous through it, StopRank honoured.
//   ftune-rank score --model DIR [--adapter DIR] --tokens FILE ...
//   ftune-rank generate --model DIR [--adapter DIR] (--prompt TEXT | --messages FILE)
//                       [--max-new-tokens N] [--temperature T --top-k K --top-p P --seed S]
//                       [--load-in-4bit] [--device cpu|cuda] [-o text|json]
//       Chat with the model: its chat template, prefill + KV-cache decode,
//       the text streamed to stdout (generate_command.h).
//   ftune-rank quantize --model DIR --out DIR [--blocksize 64]
//                       [--no-double-quant] [--compute-dtype bfloat16]
//       The model pre-quantized in transformers + bitsandbytes' 4-bit layout.
//   ftune-rank export --model DIR --adapter DIR --out DIR
//       A merged dense model directory (PEFT merge_and_unload).
//   ftune-rank plan --spec job.yaml [--world-size N] [--device-memory 24GiB]
//                   [--preset llama3-70b]
//       Predicted peak device and host memory per rank (memory_plan.h), for
//       the spec's model or a preset shape, as JSON; exit 3 when it does not
//       fit --device-memory.
//   ftune-rank info
//       JSON: LibTorch version, whether CUDA and NCCL/Gloo are usable.
//   ftune-rank init-model --out DIR [--preset tiny|llama3-8b|...|qwen2.5-72b]
//                         (--tokenizer-corpus FILE | --tokenizer-dir DIR)
//       A random-weight Llama / Mistral / Qwen2.5 directory with a tokenizer
//       (demo, benchmarks).
//
// Exit codes: 0 ok; 2 usage error or bad input (flags, spec, files);
// 1 failure while computing or communicating.
#include <signal.h>
#include <unistd.h>

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

#include <atomic>
#include <chrono>
#include <iomanip>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "channel.h"
#include "ftune/v1/rank_channel.pb.h"
#include "jobspec.h"
#include "worker/comm/channel_rendezvous.h"
#include "worker/comm/communicator.h"
#include "worker/comm/local_launcher.h"
#include "worker/comm/local_rendezvous.h"
#if defined(FTUNE_COMM_HAVE_GLOO)
#include "worker/comm/gloo_communicator.h"
#endif
#if defined(FTUNE_COMM_HAVE_NCCL)
#include "worker/comm/nccl_communicator.h"
#endif
#include "worker/trainer/bnb_checkpoint.h"
#include "worker/trainer/checkpoint.h"
#include "worker/trainer/events.h"
#if defined(FTUNE_RANK_HAVE_INIT_MODEL)
#include "worker/modelio/init_model.h"
#endif
#include "worker/modelio/llama_config.h"
#include "worker/modelio/memory_plan.h"
#include "worker/config/plan_spec.h"
#if defined(FTUNE_RANK_HAVE_GENERATE)
#include "worker/trainer/generate_command.h"
#endif
#include "worker/trainer/merge.h"
#include "worker/trainer/score.h"
#if defined(FTUNE_RANK_HAVE_TRAIN)
#include "worker/trainer/train.h"
#endif

namespace {

namespace trainer = ftune::trainer;
using json = nlohmann::json;
using ftune::Status;

constexpr int kOk = 0;
constexpr int kFailed = 1;
constexpr int kUsage = 2;

// INTERNAL/UNAVAILABLE/ABORTED/DEADLINE are the engine or its peers failing;
// every other code is about what the user gave us.
int ExitCodeFor(const Status& s) {
  switch (s.code()) {
    case ftune::StatusCode::kInternal:
    case ftune::StatusCode::kUnavailable:
    case ftune::StatusCode::kAborted:
    case ftune::StatusCode::kDeadlineExceeded:
      return kFailed;
    default:
      return kUsage;
  }
}

// A job YAML as `ftune submit` reads it: LoadJobSpec (proto/jobspec.h)
// with relative paths meaning what they meant where the user ran the
// command.
Status LoadSpec(const std::string& path, ftune::v1::JobSpec* spec) {
  char cwd[4096];
  const std::string base = ::getcwd(cwd, sizeof(cwd)) != nullptr ? cwd : "";
  ftune::Result<ftune::v1::JobSpec> loaded = ftune::LoadJobSpec(path, base);
  if (!loaded.ok()) return loaded.status();
  *spec = std::move(*loaded);
  return ftune::OkStatus();
}

#if defined(FTUNE_RANK_HAVE_TRAIN)
std::atomic<trainer::StopFlag*> g_stop{nullptr};

void OnTerminate(int) {
  // Only async-signal-safe work: flip atomics.
  if (trainer::StopFlag* f = g_stop.load()) f->Request(/*save_checkpoint=*/false);
}

void InstallStopSignals(trainer::StopFlag* flag) {
  g_stop.store(flag);
  struct sigaction sa {};
  sa.sa_handler = OnTerminate;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
}

// Builds the communicator of a multi-rank job over `rendezvous`: NCCL on
// CUDA devices, Gloo on the CPU.
Status MakeCommunicator(ftune::comm::Rendezvous& rendezvous, const std::string& device,
                        int local_device, std::unique_ptr<ftune::comm::Communicator>* out) {
  if (device.rfind("cuda", 0) == 0) {
#if defined(FTUNE_COMM_HAVE_NCCL)
    ftune::comm::NcclOptions o;
    o.device = local_device;
    o.setup_timeout = std::chrono::minutes(10);
    return ftune::comm::CreateNcclCommunicator(rendezvous, o, out);
#else
    (void)local_device;
    return ftune::FailedPreconditionError(
        "device " + device + " needs the NCCL backend, and this ftune-rank was built without "
        "it (FTUNE_CUDA=OFF)");
#endif
  }
#if defined(FTUNE_COMM_HAVE_GLOO)
  ftune::comm::GlooOptions o;
  o.host = "127.0.0.1";
  if (const char* host = std::getenv("FTUNE_COMM_HOST")) o.host = host;
  o.setup_timeout = std::chrono::minutes(10);
  return ftune::comm::CreateGlooCommunicator(rendezvous, o, out);
#else
  return ftune::FailedPreconditionError(
      "CPU ranks need the Gloo backend, and this ftune-rank was built without it (libgloo-dev)");
#endif
}

std::string SummaryJson(const trainer::TrainResult& r, int world_size) {
  return json{{"final_step", r.final_step},
              {"final_loss", r.final_loss},
              {"stopped", r.stopped},
              {"adapter_dir", r.adapter_dir},
              {"last_checkpoint", r.last_checkpoint},
              {"tokens_total", r.tokens_total},
              {"tokens_per_second_per_rank", r.tokens_per_second},
              {"world_size", world_size},
              {"peak_rss_bytes", r.peak_rss_bytes},
              {"losses", r.losses}}
      .dump();
}

struct TrainFlags {
  std::string spec_path;
  int nproc = 1;
  std::string device = "cpu";
  std::string output_dir;
  std::string resume_from;
  std::string profile_steps;  // overrides training.profile_steps
  bool json = false;
};

// One rank of a standalone run (rank 0 of 1 runs in the calling process).
// CPU ranks of one job share the machine's cores (N ranks each with all of
// them would thrash). The same rule in `train` and `run` keeps a standalone
// run and an agent-launched one bit-identical: results of parallel CPU
// kernels depend on their thread count.
void ShareCores(const std::string& device, int ranks_on_host) {
  if (device != "cpu") return;
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  at::set_num_threads(static_cast<int>(std::max(1u, cores / std::max(1, ranks_on_host))));
}

int TrainOneRank(const TrainFlags& flags, const ftune::v1::JobSpec& spec, int rank,
                 const std::string& store_address) {
  ShareCores(flags.device, flags.nproc);
  trainer::ConsoleEventSink console(std::cerr, flags.json, rank);
  trainer::StopFlag stop;
  InstallStopSignals(&stop);
  trainer::TrainContext ctx;
  ctx.rank = rank;
  ctx.world_size = flags.nproc;
  ctx.device = flags.device;
  if (flags.device == "cuda" && flags.nproc > 1) {
    // Each rank sees only its GPU, as under the agent (docs/control-plane.md):
    // set before this process touches CUDA, so cuda:0 is GPU `rank`.
    // A CUDA_VISIBLE_DEVICES the user set picks which GPUs the ranks take.
    std::string gpu = std::to_string(rank);
    if (const char* visible = std::getenv("CUDA_VISIBLE_DEVICES")) {
      std::stringstream list(visible);
      std::string item;
      for (int i = 0; std::getline(list, item, ','); ++i) {
        if (i == rank) gpu = item;
      }
    }
    ::setenv("CUDA_VISIBLE_DEVICES", gpu.c_str(), /*overwrite=*/1);
    ctx.device = "cuda:0";
  }
  ctx.output_dir = flags.output_dir.empty() ? spec.output_dir() : flags.output_dir;
  if (ctx.output_dir.empty()) ctx.output_dir = "ftune-output";
  ctx.events = &console;
  ctx.stop = &stop;
  if (flags.resume_from == "auto") {
    ftune::Result<std::string> latest = trainer::LatestCompleteCheckpoint(ctx.output_dir);
    if (!latest.ok()) {
      std::cerr << "ftune-rank train: " << latest.status().ToString() << "\n";
      return kUsage;
    }
    ctx.resume_from = *latest;
  } else {
    ctx.resume_from = flags.resume_from;
  }
  std::unique_ptr<ftune::comm::Communicator> comm;
  if (flags.nproc > 1) {
    std::unique_ptr<ftune::comm::LocalRendezvous> rendezvous;
    Status s = ftune::comm::LocalRendezvous::Connect(store_address, rank, flags.nproc,
                                                     std::chrono::minutes(2), &rendezvous);
    if (s.ok()) s = MakeCommunicator(*rendezvous, ctx.device, 0, &comm);
    if (!s.ok()) {
      std::cerr << "ftune-rank train (rank " << rank << "): " << s.ToString() << "\n";
      return kFailed;
    }
    ctx.comm = comm.get();
  }
  ftune::Result<trainer::TrainResult> result = trainer::Train(spec, ctx);
  if (!result.ok()) {
    std::cerr << "ftune-rank train (rank " << rank << "): " << result.status().ToString() << "\n";
    return ExitCodeFor(result.status());
  }
  if (rank == 0) std::cout << SummaryJson(*result, flags.nproc) << "\n" << std::flush;
  return kOk;
}

int RunTrain(const TrainFlags& flags) {
  ftune::v1::JobSpec spec;
  if (Status s = LoadSpec(flags.spec_path, &spec); !s.ok()) {
    std::cerr << "ftune-rank train: " << s.ToString() << "\n";
    return kUsage;
  }
  if (!flags.profile_steps.empty()) {
    spec.mutable_training()->set_profile_steps(flags.profile_steps);
    if (Status s = ftune::ResolveJobSpec(&spec); !s.ok()) {
      std::cerr << "ftune-rank train: --profile-steps: " << s.ToString() << "\n";
      return kUsage;
    }
  }
  if (flags.nproc == 1) return TrainOneRank(flags, spec, 0, "");
  std::unique_ptr<ftune::comm::LocalRankGroup> group;
  ftune::comm::LocalLaunchOptions launch;
  launch.nproc = flags.nproc;
  Status s = ftune::comm::LocalRankGroup::Start(
      launch,
      [&](int rank, const std::string& store) { return TrainOneRank(flags, spec, rank, store); },
      &group);
  if (!s.ok()) {
    std::cerr << "ftune-rank train: cannot start " << flags.nproc << " ranks: " << s.ToString()
              << "\n";
    return kFailed;
  }
  // No overall deadline (a fine-tune takes what it takes); once one rank
  // fails the others get a minute to notice through their collectives.
  const std::vector<ftune::comm::RankExit> exits =
      group->Wait(std::chrono::hours(24 * 365), std::chrono::minutes(1));
  int code = kOk;
  for (const ftune::comm::RankExit& e : exits) {
    if (e.ok()) continue;
    std::cerr << "ftune-rank train: " << e.Describe() << "\n";
    const int rc = e.exited && WIFEXITED(e.wait_status) ? WEXITSTATUS(e.wait_status) : kFailed;
    if (code == kOk || rc == kUsage) code = rc == kOk ? kFailed : rc;
  }
  return code;
}

struct RunFlags {
  int channel_fd = -1;
  std::string spec_path, job_id, device = "cpu", output_dir, resume_from;
  int64_t attempt = 0;
  int rank = 0, world_size = 1;
};

// `run`: one rank under an agent.
int RunAgentRank(const RunFlags& flags) {
  ftune::Channel channel(flags.channel_fd);
  trainer::ChannelEventSink events(&channel);
  trainer::StopFlag stop;
  InstallStopSignals(&stop);
  const auto fail = [&](const Status& s) {
    ftune::v1::RankMessage m;
    m.mutable_error()->set_message(s.ToString());
    events.Emit(m);
    std::cerr << "ftune-rank run (job " << flags.job_id << " rank " << flags.rank
              << "): " << s.ToString() << "\n";
    return ExitCodeFor(s);
  };

  ftune::v1::JobSpec spec;
  if (Status s = LoadSpec(flags.spec_path, &spec); !s.ok()) return fail(s);
  // CPU jobs run all their ranks on one host (an agent's CPU slots).
  ShareCores(flags.device, flags.world_size);
  // Hello first: the agent counts the rank as started from it, and the
  // coordinator marks the job RUNNING once every rank said it.
  // A damaged checkpoint (a rank killed while writing it, a bad disk) falls
  // back to the one before it rather than failing every restart the same way.
  trainer::ResumePoint resume;
  if (!flags.resume_from.empty()) {
    ftune::Result<trainer::ResumePoint> chosen =
        trainer::ChooseResumePoint(flags.resume_from, /*set_aside=*/flags.rank == 0);
    if (!chosen.ok()) return fail(chosen.status());
    resume = *std::move(chosen);
  }
  trainer::EmitHello(events, flags.rank, flags.world_size, flags.device, resume.state.step);
  if (!resume.fallback.empty() && flags.rank == 0) {
    ftune::v1::RankMessage m;
    m.mutable_log()->set_level("WARNING");
    m.mutable_log()->set_text(resume.fallback);
    events.Emit(m);
  }
  const auto on_agent_message = [&](const ftune::v1::AgentMessage& m) {
    if (m.has_stop()) stop.Request(m.stop().save_checkpoint());
  };
  std::unique_ptr<ftune::comm::Communicator> comm;
  if (flags.world_size > 1) {
    ftune::comm::ChannelRendezvous rendezvous(&channel, flags.rank, flags.world_size,
                                              on_agent_message);
    if (Status s = MakeCommunicator(rendezvous, flags.device, 0, &comm); !s.ok()) return fail(s);
  }
  // From here on this thread only writes; the reader takes StopRank. End of
  // stream means the agent is gone: nobody will collect our events, stop.
  std::thread reader([&] {
    ftune::v1::AgentMessage m;
    while (channel.Read(&m)) on_agent_message(m);
    stop.Request(/*save_checkpoint=*/false);  // the agent is gone
  });
  reader.detach();

  trainer::TrainContext ctx;
  ctx.rank = flags.rank;
  ctx.world_size = flags.world_size;
  ctx.device = flags.device;
  ctx.output_dir = flags.output_dir;
  ctx.resume_from = resume.dir;
  ctx.comm = comm.get();
  ctx.events = &events;
  ctx.stop = &stop;
  ctx.emit_hello = false;
  ftune::Result<trainer::TrainResult> result = trainer::Train(spec, ctx);
  if (!result.ok()) return fail(result.status());
  // The reader thread is blocked in read(); exiting closes everything.
  std::cout.flush();
  ::_exit(kOk);
}

#endif  // FTUNE_RANK_HAVE_TRAIN

int RunPlan(const std::string& spec_path, int world, const std::string& device_memory,
            const std::string& preset) {
  ftune::v1::JobSpec spec;
  if (Status st = LoadSpec(spec_path, &spec); !st.ok()) {
    std::cerr << "ftune-rank plan: " << st.ToString() << "\n";
    return kUsage;
  }
  // A preset shape, or (nullptr) the spec's model config.json.
  std::optional<trainer::LlamaConfig> preset_config;
#if defined(FTUNE_RANK_HAVE_INIT_MODEL)
  if (!preset.empty()) {
    // The checkpoint's own vocabulary (the tiny preset, which has none, gets
    // Llama 3's).
    ftune::Result<trainer::LlamaConfig> c =
        trainer::InitModelPresetConfig(preset, preset == "tiny" ? 128256 : 1);
    if (!c.ok()) {
      std::cerr << "ftune-rank plan: " << c.status().ToString() << "\n";
      return kUsage;
    }
    preset_config = *c;
  }
#endif
  int64_t device_bytes = 0;
  if (!device_memory.empty() && !ftune::ParseByteSize(device_memory, &device_bytes)) {
    std::cerr << "ftune-rank plan: --device-memory '" << device_memory
              << "' is not a size (e.g. 24GiB, 80GB)\n";
    return kUsage;
  }
  ftune::Result<trainer::MemoryPlan> plan =
      trainer::PlanJob(spec, world, preset_config ? &*preset_config : nullptr);
  if (!plan.ok()) {
    std::cerr << "ftune-rank plan: " << plan.status().ToString() << "\n";
    return kUsage;
  }
  const int world_size = world > 0 ? world : spec.resources().num_ranks();
  std::cerr << plan->ToString();
  const bool fits = device_bytes == 0 || plan->FitsDevice(device_bytes);
  std::cout << json{{"world_size", world_size},
                    {"device_peak_bytes", plan->device_peak_bytes},
                    {"host_peak_bytes", plan->host_peak_bytes},
                    {"loading_host_peak_bytes", plan->loading_host_peak_bytes},
                    {"frozen_shard_bytes", plan->frozen_shard_bytes},
                    {"lora_params", plan->lora_params},
                    {"fits", fits}}
                   .dump()
            << "\n";
  return fits ? kOk : 3;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("ftune-rank: the ftune training engine (one rank)", "ftune-rank");
  app.require_subcommand(1);

#if defined(FTUNE_RANK_HAVE_TRAIN)
  TrainFlags train;
  CLI::App* train_cmd = app.add_subcommand(
      "train", "Fine-tune standalone from a job YAML (N local ranks with --nproc)");
  train_cmd->add_option("--spec", train.spec_path, "job YAML (the same file `ftune submit` takes)")
      ->required();
  train_cmd->add_option("--nproc", train.nproc, "local ranks (Gloo on CPU, NCCL on GPUs)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  train_cmd->add_option("--device", train.device, "cpu (fp32) or cuda (bf16)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  train_cmd->add_option("--output-dir", train.output_dir,
                        "checkpoints and adapter (default: the spec's output_dir, else "
                        "./ftune-output)");
  train_cmd->add_option("--resume-from", train.resume_from,
                        "checkpoint directory, or 'auto' for the latest complete one");
  train_cmd->add_option("--profile-steps", train.profile_steps,
                        "trace these optimizer steps (e.g. 5-7) into <output_dir>/profile/ "
                        "(training.profile_steps)");
  train_cmd->add_flag("--json", train.json, "events as JSON lines on stderr");

  RunFlags run;
  CLI::App* run_cmd = app.add_subcommand("run", "One rank launched by ftune-agent");
  run_cmd->add_option("--channel-fd", run.channel_fd, "agent channel descriptor")->required();
  run_cmd->add_option("--spec", run.spec_path, "job YAML")->required();
  run_cmd->add_option("--job-id", run.job_id, "job id")->required();
  run_cmd->add_option("--attempt", run.attempt, "attempt")->required();
  run_cmd->add_option("--rank", run.rank, "rank")->required();
  run_cmd->add_option("--world-size", run.world_size, "ranks in the gang")->required();
  run_cmd->add_option("--device", run.device, "cpu or cuda:0")->required();
  run_cmd->add_option("--output-dir", run.output_dir, "output directory")->required();
  run_cmd->add_option("--resume-from", run.resume_from, "checkpoint to resume from");

#endif

  trainer::ScoreOptions score;
  CLI::App* score_cmd = app.add_subcommand(
      "score",
      "Per-token log-probabilities and mean loss of token sequences as JSON on stdout "
      "(parity checks against transformers/peft)");
  score_cmd->add_option("--model", score.model_dir, "HF Llama model directory")->required();
  score_cmd->add_option("--adapter", score.adapter_dir, "PEFT adapter directory (optional)");
  score_cmd
      ->add_option("--tokens", score.tokens_path,
                   "JSONL file: per line {\"input_ids\": [...], \"labels\": [...]} (labels "
                   "optional, -100 ignored) or a JSON array of ids")
      ->required();
  score_cmd
      ->add_option("--chunk", score.chunk_tokens,
                   "tokens per lm_head/log-softmax chunk (bounds the logits memory)")
      ->capture_default_str();
  score_cmd->add_option("--device", score.device, "cpu (fp32) or cuda (bf16)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();

#if defined(FTUNE_RANK_HAVE_GENERATE)
  trainer::GenerateCommandOptions gen;
  std::string gen_output = "text";
  CLI::App* gen_cmd = app.add_subcommand(
      "generate", "Generate a reply with the model's chat template, streamed to stdout");
  gen_cmd->add_option("--model", gen.model_dir,
                      "HF Llama directory: dense, merged export, or bitsandbytes 4-bit")
      ->required();
  gen_cmd->add_option("--adapter", gen.adapter_dir, "PEFT adapter directory (optional)");
  gen_cmd->add_option("--tokenizer", gen.tokenizer_dir,
                      "directory with tokenizer.json (default: --model)");
  gen_cmd->add_option("--prompt", gen.prompt, "one user message");
  gen_cmd->add_option("--system", gen.system, "a system message before --prompt");
  gen_cmd->add_option("--messages", gen.messages_path,
                      "JSONL, one {\"role\": ..., \"content\": ...} per line");
  gen_cmd->add_option("--input-ids", gen.input_ids,
                      "comma-separated prompt ids, used as given (no template)");
  gen_cmd->add_option("--chat-template", gen.chat_template,
                      "auto, llama3, llama3.1, llama2, chatml, mistral, qwen2.5, mistral-v0.3, "
                      "or none (plain text)")
      ->capture_default_str();
  gen_cmd->add_option("--max-new-tokens", gen.max_new_tokens, "at most this many new tokens")
      ->capture_default_str();
  gen_cmd->add_option("--temperature", gen.sampling.temperature, "0: greedy; > 0: sample")
      ->capture_default_str();
  gen_cmd->add_option("--top-k", gen.sampling.top_k, "sampling: keep the k most likely (0: off)")
      ->capture_default_str();
  gen_cmd->add_option("--top-p", gen.sampling.top_p, "sampling: nucleus mass in (0, 1]")
      ->capture_default_str();
  gen_cmd->add_option("--seed", gen.sampling.seed, "sampling seed")->capture_default_str();
  gen_cmd->add_flag("--ignore-eos", gen.ignore_eos,
                    "generate --max-new-tokens whatever comes (benchmarks)");
  gen_cmd->add_flag("--load-in-4bit", gen.load_in_4bit,
                    "quantize a dense base to NF4 at load, as training does");
  gen_cmd->add_option("--device", gen.device, "cpu (fp32) or cuda (bf16)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  gen_cmd->add_option("-o,--output", gen_output, "text (streamed) or json (JSON lines)")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
#endif

  std::string quant_in, quant_out;
  trainer::QuantizeModelOptions quant;
  bool no_double_quant = false;
  std::string quant_device = "cpu";
  CLI::App* quant_cmd = app.add_subcommand(
      "quantize", "Write a model pre-quantized to NF4 in transformers + bitsandbytes' layout");
  quant_cmd->add_option("--model", quant_in, "dense HF Llama directory")->required();
  quant_cmd->add_option("--out", quant_out, "output directory")->required();
  quant_cmd->add_option("--blocksize", quant.nf4.blocksize, "NF4 block size")
      ->capture_default_str();
  quant_cmd->add_flag("--no-double-quant", no_double_quant,
                      "plain fp32 absmax (bnb_4bit_use_double_quant: false)");
  quant_cmd->add_option("--compute-dtype", quant.compute_dtype, "bnb_4bit_compute_dtype")
      ->check(CLI::IsMember({"bfloat16", "float16", "float32"}))
      ->capture_default_str();
  quant_cmd->add_option("--device", quant_device, "cpu or cuda (same bytes, faster)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();

  trainer::MergeOptions merge;
  CLI::App* export_cmd = app.add_subcommand(
      "export", "Merge a PEFT adapter into its dense base model (a directory transformers loads)");
  export_cmd->add_option("--model", merge.model_dir, "dense HF Llama base directory")->required();
  export_cmd->add_option("--adapter", merge.adapter_dir, "PEFT adapter directory")->required();
  export_cmd->add_option("--out", merge.out_dir, "output directory")->required();

#if defined(FTUNE_RANK_HAVE_INIT_MODEL)
  trainer::InitModelOptions init;
  CLI::App* init_cmd = app.add_subcommand(
      "init-model",
      "Write a random-weight Llama model directory (config, bf16 safetensors, tokenizer)");
  init_cmd->add_option("--out", init.out_dir, "output directory (must not hold a model)")
      ->required();
  init_cmd->add_option("--preset", init.preset, "model shape")
      ->check(CLI::IsMember(trainer::InitModelPresets()))
      ->capture_default_str();
  init_cmd->add_option("--tokenizer-corpus", init.tokenizer_corpus,
                       "JSONL records (messages/text/prompt+completion) to train a BPE "
                       "tokenizer on");
  init_cmd->add_option("--tokenizer-dir", init.tokenizer_dir,
                       "copy tokenizer.json/tokenizer_config.json from this directory instead");
  init_cmd->add_option("--vocab-size", init.vocab_size, "ids of a trained tokenizer")
      ->capture_default_str();
  init_cmd->add_option("--seed", init.seed, "weight seed")->capture_default_str();
  init_cmd->add_option("--layers", init.num_layers_override,
                       "decoder layers instead of the preset's (0: the preset's)");
  bool init_no_weights = false;
  init_cmd->add_flag("--no-weights", init_no_weights,
                     "config.json and tokenizer only (for jobs with model.random_weights)");
#endif

  std::string plan_spec, plan_preset, plan_memory;
  int plan_world = 0;
  CLI::App* plan_cmd = app.add_subcommand(
      "plan", "Predict per-rank peak device and host memory of a job (JSON)");
  plan_cmd->add_option("--spec", plan_spec, "job YAML")->required();
  plan_cmd->add_option("--world-size", plan_world, "ranks (default: resources.num_ranks)");
  plan_cmd->add_option("--device-memory", plan_memory,
                       "memory of each GPU, e.g. 24GiB or 80GB: exit 3 when the plan does not fit");
#if defined(FTUNE_RANK_HAVE_INIT_MODEL)
  plan_cmd->add_option("--preset", plan_preset,
                       "plan for a preset shape instead of the spec's model directory")
      ->check(CLI::IsMember(trainer::InitModelPresets()));
#endif

  CLI::App* info_cmd =
      app.add_subcommand("info", "What this build can run on (LibTorch, CUDA, NCCL, Gloo) as JSON");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? kOk : kUsage;
  }

#if defined(FTUNE_RANK_HAVE_TRAIN)
  if (train_cmd->parsed()) return RunTrain(train);
  if (run_cmd->parsed()) return RunAgentRank(run);
#endif
  if (plan_cmd->parsed()) return RunPlan(plan_spec, plan_world, plan_memory, plan_preset);
  if (info_cmd->parsed()) {
#if defined(FTUNE_COMM_HAVE_NCCL)
    const bool nccl = true;
#else
    const bool nccl = false;
#endif
#if defined(FTUNE_COMM_HAVE_GLOO)
    const bool gloo = true;
#else
    const bool gloo = false;
#endif
#if defined(FTUNE_RANK_HAVE_TRAIN)
    const bool train = true;
#else
    const bool train = false;
#endif
    std::cout << json{{"torch_version", TORCH_VERSION},
                      {"cuda", at::hasCUDA()},
                      {"nccl", nccl},
                      {"gloo", gloo},
                      {"train", train}}
                     .dump()
              << "\n";
    return kOk;
  }
  if (score_cmd->parsed()) {
    ftune::Result<std::string> out = trainer::RunScore(score);
    if (!out.ok()) {
      std::cerr << "ftune-rank score: " << out.status().ToString() << "\n";
      return out.status().code() == ftune::StatusCode::kInternal ? kFailed : kUsage;
    }
    std::cout << *out << "\n";
    return kOk;
  }
#if defined(FTUNE_RANK_HAVE_GENERATE)
  if (gen_cmd->parsed()) {
    gen.json = gen_output == "json";
    const Status s = trainer::RunGenerate(gen, std::cout, std::cerr);
    if (!s.ok()) {
      std::cout << std::flush;
      std::cerr << "ftune-rank generate: " << s.ToString() << "\n";
      return ExitCodeFor(s);
    }
    return kOk;
  }
#endif
  if (quant_cmd->parsed()) {
    quant.nf4.double_quant = !no_double_quant;
    quant.device = c10::Device(quant_device == "cuda" ? "cuda:0" : "cpu");
    const Status s = trainer::QuantizeModelDirectory(quant_in, quant_out, quant);
    if (!s.ok()) {
      std::cerr << "ftune-rank quantize: " << s.ToString() << "\n";
      return ExitCodeFor(s);
    }
    std::cout << json{{"out", quant_out}}.dump() << "\n";
    return kOk;
  }
  if (export_cmd->parsed()) {
    merge.progress = [](const std::string& line) { std::cerr << line << "\n"; };
    ftune::Result<trainer::MergeReport> r = trainer::MergeAdapter(merge);
    if (!r.ok()) {
      std::cerr << "ftune-rank export: " << r.status().ToString() << "\n";
      return ExitCodeFor(r.status());
    }
    std::cout << json{{"out", merge.out_dir},
                      {"merged_projections", r->merged_projections},
                      {"copied_tensors", r->copied_tensors},
                      {"files", r->files_written},
                      {"bytes", r->bytes_written}}
                     .dump()
              << "\n";
    return kOk;
  }
#if defined(FTUNE_RANK_HAVE_INIT_MODEL)
  if (init_cmd->parsed()) {
    init.progress = [](const std::string& line) { std::cerr << line << "\n"; };
    init.write_weights = !init_no_weights;
    const Status s = trainer::InitModel(init);
    if (!s.ok()) {
      std::cerr << "ftune-rank init-model: " << s.ToString() << "\n";
      return ExitCodeFor(s);
    }
    std::cout << json{{"out", init.out_dir}, {"preset", init.preset}}.dump() << "\n";
    return kOk;
  }
#endif
  return kUsage;  // unreachable: require_subcommand(1)
}
