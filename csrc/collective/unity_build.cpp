// The whole collective backend as one translation unit. Parsing ATen's headers costs ~20 s per
// file on a CI core, so building the small files below as one unit saves minutes per build;
// setup.py compiles this file instead of each of them. Keep the list in step with the folder
// (test_build.py checks it).
#include "checks.cpp"
#include "combine.cpp"
#include "dispatch.cpp"
#include "fp8.cpp"
#include "handle.cpp"
#include "layout.cpp"
#include "logfmt.cpp"
#include "low_latency_checks.cpp"
#include "low_latency_combine.cpp"
#include "low_latency_dispatch.cpp"
#include "permute_map.cpp"
#include "permuted.cpp"
#include "process_group.cpp"
#include "register.cpp"
#include "routing.cpp"
#include "watched_exchange.cpp"
