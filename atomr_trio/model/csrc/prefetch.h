// Requests for memory ahead of its use, spread over a loop (the matmul tiles of linear_bf16.cpp
// and linear_int8.cpp ask so for the next panel of weights).
#pragma once

#include <cstdint>

namespace atomr_prefetch {

// `lines` cache lines of 64 bytes from `from`, to be requested into L2 evenly over a loop of
// `steps` iterations: call on(steps) once per iteration; after the last, every line was asked for.
// lines == 0: no request.
struct Ask {
  const char* from = nullptr;
  int64_t lines = 0;
  int64_t asked = 0;  // lines asked for so far
  int64_t owed = 0;   // lines * (iterations so far) not yet asked for, in units of 1 / steps

  void on(int64_t steps) {
    for (owed += lines; owed >= steps; owed -= steps) __builtin_prefetch(from + 64 * asked++, 0, 2);
  }
};

// Part `part` of `parts` of the lines holding the `bytes` from `from` (the parts together cover
// every line once).
inline Ask share(const void* from, int64_t bytes, int64_t part, int64_t parts) {
  if (from == nullptr || parts <= 0) return {};
  const int64_t lines = (bytes + 63) / 64, first = lines * part / parts;
  return {static_cast<const char*>(from) + first * 64, lines * (part + 1) / parts - first};
}

}  // namespace atomr_prefetch
