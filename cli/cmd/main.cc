// ftune: command-line client of ftune-coordinator. The logic lives in
// ftune_cli (cli/commands.h) so tests can drive it without a process.
// `ftune data ...` (cli/data_commands.h) runs locally, without a
// coordinator, when the tokenizer library is built.
#include <iostream>
#include <string>
#include <vector>

#include "cli/commands.h"
#ifdef FTUNE_CLI_DATA
#include "cli/data_commands.h"
#endif

int main(int argc, char** argv) {
#ifdef FTUNE_CLI_DATA
  if (argc >= 2 && std::string(argv[1]) == "data") {
    return ftune::cli::RunDataCommand(std::vector<std::string>(argv, argv + argc), std::cin,
                                      std::cout, std::cerr);
  }
#endif
  return ftune::cli::Main(argc, argv);
}
