// ftune: command-line client of ftune-coordinator. The logic lives in
// ftune_cli (cli/commands.h) so tests can drive it without a process.
// `ftune data ...` (cli/data_commands.h) runs locally, without a
// coordinator, when the tokenizer library is built.
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "cli/commands.h"
#ifdef FTUNE_CLI_DATA
#include "cli/data_commands.h"
#endif

int main(int argc, char** argv) {
  ftune::cli::DataCommand data;
#ifdef FTUNE_CLI_DATA
  data = [](const std::vector<std::string>& data_args) {
    std::vector<std::string> args = {"ftune", "data"};
    args.insert(args.end(), data_args.begin(), data_args.end());
    return ftune::cli::RunDataCommand(args, std::cin, std::cout, std::cerr);
  };
#endif
  return ftune::cli::Main(argc, argv, std::move(data));
}
