#!/usr/bin/env bash
# The GPU suite's entry point where people look for it: the suite lives beside what it runs, in evals/bench/.
exec bash "$(dirname "$0")/bench/gpu_suite.sh" "$@"
