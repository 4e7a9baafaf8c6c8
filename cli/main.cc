// ftune: command-line client of ftune-coordinator. The logic lives in
// ftune_cli (cli/commands.h) so tests can drive it without a process.
#include "cli/commands.h"

int main(int argc, char** argv) { return ftune::cli::Main(argc, argv); }
