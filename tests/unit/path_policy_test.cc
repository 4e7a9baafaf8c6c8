// What a job may touch: ftune/path_policy.h against real files, symlinks,
// a FIFO and /dev/zero, and ReadFileToString on the same (it must refuse a
// FIFO without blocking).
#include "ftune/path_policy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <future>
#include <string>

#include <gtest/gtest.h>

#include "ftune/file_util.h"
#include "temp_dir.h"

namespace ftune {
namespace {

using Kind = PathPolicy::Kind;

class PathPolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = dir_.path() + "/root";
    outside_ = dir_.path() + "/outside";
    ASSERT_TRUE(MakeDirectories(root_ + "/model").ok());
    ASSERT_TRUE(MakeDirectories(outside_).ok());
    Write(root_ + "/train.jsonl", "{\"text\": \"hi\"}\n");
    Write(root_ + "/model/config.json", "{}");
    Write(outside_ + "/secret.jsonl", "{\"text\": \"secret\"}\n");
    policy_ = *PathPolicy::Create({root_});
  }
  static void Write(const std::string& path, const std::string& text) {
    std::ofstream(path) << text;
  }
  std::string Message(const Result<std::string>& r) {
    return r.ok() ? "ok: " + *r : r.status().message();
  }

  testutil::TempDir dir_{"path_policy_test"};
  std::string root_, outside_;
  PathPolicy policy_;
};

TEST_F(PathPolicyTest, AcceptsFilesAndDirectoriesUnderARootAndResolvesThem) {
  Result<std::string> f = policy_.Check("dataset.data_files[0]", root_ + "/train.jsonl",
                                        Kind::kInputFile);
  ASSERT_TRUE(f.ok()) << f.status().message();
  EXPECT_EQ(*f, root_ + "/train.jsonl");
  EXPECT_TRUE(policy_.Check("model", root_ + "//model/", Kind::kInputDir).ok());
  // An output directory need not exist yet; the root itself is allowed.
  Result<std::string> out = policy_.Check("output_dir", root_ + "/runs/a/b", Kind::kOutputDir);
  ASSERT_TRUE(out.ok()) << out.status().message();
  EXPECT_EQ(*out, root_ + "/runs/a/b");
  EXPECT_TRUE(policy_.Check("output_dir", root_, Kind::kOutputDir).ok());
}

TEST_F(PathPolicyTest, RefusesRelativePathsDotDotAndOverlongPaths) {
  const auto check = [&](const std::string& path) {
    return Message(policy_.Check("dataset.data_files[0]", path, Kind::kInputFile));
  };
  EXPECT_NE(check("train.jsonl").find("must be an absolute path"), std::string::npos);
  // Lexically inside the root, really outside: refused on its text.
  const std::string escape = root_ + "/../outside/secret.jsonl";
  EXPECT_NE(check(escape).find("must not contain '..' components"), std::string::npos)
      << check(escape);
  EXPECT_NE(check(root_ + "/./train.jsonl").find("'.'"), std::string::npos);
  EXPECT_NE(check("/" + std::string(kMaxSpecPathBytes, 'a')).find("more than the 4096"),
            std::string::npos);
  EXPECT_NE(check(root_ + "/a\nb").find("control characters"), std::string::npos);
  EXPECT_FALSE(policy_.Check("output_dir", root_ + "/../outside", Kind::kOutputDir).ok());
}

TEST_F(PathPolicyTest, RefusesSymlinksThatLeadOutOfTheRoots) {
  ASSERT_EQ(::symlink((outside_ + "/secret.jsonl").c_str(), (root_ + "/link.jsonl").c_str()), 0);
  const std::string m =
      Message(policy_.Check("dataset.data_files[0]", root_ + "/link.jsonl", Kind::kInputFile));
  EXPECT_NE(m.find("resolves to " + outside_ + "/secret.jsonl"), std::string::npos) << m;
  EXPECT_NE(m.find("outside the allowed roots (" + root_ + ")"), std::string::npos) << m;

  // A directory symlink as output_dir, and one as a parent of a new one.
  ASSERT_EQ(::symlink(outside_.c_str(), (root_ + "/out").c_str()), 0);
  EXPECT_FALSE(policy_.Check("output_dir", root_ + "/out", Kind::kOutputDir).ok());
  EXPECT_FALSE(policy_.Check("output_dir", root_ + "/out/new/dir", Kind::kOutputDir).ok());

  // A model directory inside, with one of its files a link outside.
  ASSERT_EQ(::symlink((outside_ + "/secret.jsonl").c_str(),
                      (root_ + "/model/tokenizer.json").c_str()),
            0);
  const std::string model = Message(policy_.Check("model", root_ + "/model", Kind::kInputDir));
  EXPECT_NE(model.find("holds tokenizer.json"), std::string::npos) << model;

  // Links that stay inside are fine.
  ASSERT_EQ(::symlink((root_ + "/train.jsonl").c_str(), (root_ + "/ok.jsonl").c_str()), 0);
  Result<std::string> ok = policy_.Check("f", root_ + "/ok.jsonl", Kind::kInputFile);
  ASSERT_TRUE(ok.ok()) << ok.status().message();
  EXPECT_EQ(*ok, root_ + "/train.jsonl");
}

TEST_F(PathPolicyTest, RefusesInputsThatAreNotRegularFiles) {
  PathPolicy anywhere = *PathPolicy::Create({});
  EXPECT_FALSE(anywhere.restricted());
  const std::string zero = Message(anywhere.Check("dataset.data_files[0]", "/dev/zero",
                                                  Kind::kInputFile));
  EXPECT_NE(zero.find("is not a regular file"), std::string::npos) << zero;
  const std::string fifo = root_ + "/fifo.jsonl";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_NE(Message(policy_.Check("f", fifo, Kind::kInputFile)).find("is not a regular file"),
            std::string::npos);
  EXPECT_NE(Message(policy_.Check("model", root_ + "/train.jsonl", Kind::kInputDir))
                .find("is not a directory"),
            std::string::npos);
  EXPECT_EQ(policy_.Check("f", root_ + "/missing.jsonl", Kind::kInputFile).status().code(),
            StatusCode::kNotFound);
}

TEST_F(PathPolicyTest, CheckSpecPassesWhatThisHostLacksOnItsText) {
  SpecPaths paths;
  paths.model = {"model.model_name_or_path", "/elsewhere/model"};
  // Missing here: fine on the coordinator, not on the agent.
  PathPolicy open = *PathPolicy::Create({});
  EXPECT_TRUE(open.CheckSpec(paths, /*must_exist=*/false).ok());
  EXPECT_FALSE(open.CheckSpec(paths, /*must_exist=*/true).ok());
  // Outside the roots on its text: refused even where it does not exist.
  const Status st = policy_.CheckSpec(paths, /*must_exist=*/false);
  EXPECT_NE(st.message().find("model.model_name_or_path (/elsewhere/model) is outside"),
            std::string::npos)
      << st.message();
  paths.model = {"model.model_name_or_path", root_ + "/model"};
  paths.inputs = {{"dataset.data_files[0]", "/dev/zero"}};
  EXPECT_NE(open.CheckSpec(paths, false).message().find("not a regular file"), std::string::npos);
  paths.inputs = {{"dataset.data_files[0]", root_ + "/train.jsonl"}};
  paths.output_dir = {"output_dir", root_ + "/out-new"};
  EXPECT_TRUE(policy_.CheckSpec(paths, true).ok());
  EXPECT_FALSE(PathPolicy::Create({"relative/root"}).ok());
}

TEST_F(PathPolicyTest, ReadingAFifoOrADeviceFailsAtOnce) {
  const std::string fifo = root_ + "/config.json";
  ::unlink(fifo.c_str());
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  // Opened without O_NONBLOCK, this would wait for a writer forever.
  auto read = std::async(std::launch::async, [&] { return ReadFileToString(fifo, 1 << 20); });
  ASSERT_EQ(read.wait_for(std::chrono::seconds(5)), std::future_status::ready)
      << "reading a FIFO blocked";
  Result<std::string> r = read.get();
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("not a regular file"), std::string::npos);
  Result<std::string> zero = ReadFileToString("/dev/zero", 1 << 20);
  EXPECT_EQ(zero.status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ftune
