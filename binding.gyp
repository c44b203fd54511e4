{
  "targets": [
    {
      "target_name": "soppu_native",
      "sources": [
        "native/src/addon.cc",
        "native/src/cpu.cc",
        "native/src/thread-pool.cc",
        "native/src/matmul.cc",
        "native/src/gemm.cc",
        "native/src/ops.cc",
        "native/src/attention.cc",
        "native/src/lora.cc",
        "native/src/large-pages.cc"
      ],
      "include_dirs": ["<!@(node -p \"require('node-addon-api').include\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions"],
      "cflags_cc": ["-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math", "-pthread"],
      "ldflags": ["-pthread"]
    }
  ]
}
