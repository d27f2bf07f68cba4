// edgepack MCU firmware template: run an edgepack "tflm" bundle with TensorFlow Lite Micro.
//
// Copy tflm/model_data.cc, tflm/model_data.h and tflm/model_config.h from the bundle next to
// this file (or unpack them in your build: see README.md). Everything model-specific comes from
// those generated files; this file only wires them into tflite::MicroInterpreter.
//
// Board glue you provide: read_sensor() fills float features, report() consumes the result.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "model_config.h"
#include "model_data.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/system_setup.h"
#include "tensorflow/lite/schema/schema_generated.h"

extern "C" void read_sensor(float* features, int n);          // board-specific
extern "C" void report(int label, float score, uint32_t us);  // board-specific
extern "C" uint32_t micros_now(void);                         // board-specific timer

namespace {

// The arena holds every activation, scratch buffer and TFLM's own structures. Keep it in fast
// internal SRAM (not PSRAM): on ESP32-S3 use DRAM_ATTR / heap_caps_malloc(MALLOC_CAP_INTERNAL),
// on STM32H7 place it in AXI SRAM through the linker script.
alignas(16) uint8_t g_arena[edgepack_model::kTensorArenaSize];

edgepack_model::OpResolver g_resolver;
tflite::MicroInterpreter* g_interpreter = nullptr;

template <typename T>
T quantize(float x, float scale, int zero_point) {
  const int32_t lo = sizeof(T) == 1 && static_cast<T>(-1) < 0 ? -128 : 0;
  const int32_t hi = sizeof(T) == 1 && static_cast<T>(-1) < 0 ? 127 : 255;
  int32_t q = static_cast<int32_t>(std::lround(x / scale)) + zero_point;
  return static_cast<T>(q < lo ? lo : (q > hi ? hi : q));
}

}  // namespace

extern "C" int edgepack_model_setup(void) {
  tflite::InitializeTarget();
  const tflite::Model* model = tflite::GetModel(g_model_data);
  if (model->version() != TFLITE_SCHEMA_VERSION) {
    MicroPrintf("model schema %d != TFLM schema %d", model->version(), TFLITE_SCHEMA_VERSION);
    return -1;
  }
  if (edgepack_model::RegisterOps(g_resolver) != kTfLiteOk) {
    MicroPrintf("op registration failed (kOpCount too small?)");
    return -2;
  }
  static tflite::MicroInterpreter interpreter(model, g_resolver, g_arena,
                                              edgepack_model::kTensorArenaSize);
  if (interpreter.AllocateTensors() != kTfLiteOk) {
    MicroPrintf("AllocateTensors failed: the arena (%u B) is too small for this model",
                static_cast<unsigned>(edgepack_model::kTensorArenaSize));
    return -3;
  }
  // Compare with edgepack's estimate and trim kTensorArenaSize if you need the RAM.
  MicroPrintf("arena used %u of %u B (edgepack estimate %u B)",
              static_cast<unsigned>(interpreter.arena_used_bytes()),
              static_cast<unsigned>(edgepack_model::kTensorArenaSize),
              static_cast<unsigned>(edgepack_model::kArenaEstimateBytes));
  g_interpreter = &interpreter;
  return 0;
}

// One inference on float features; returns the arg-max class (classifiers) or -1.
extern "C" int edgepack_model_infer(const float* features) {
  TfLiteTensor* in = g_interpreter->input(0);
  const int n = edgepack_model::kInputElements;
  if (in->type == kTfLiteInt8) {
    for (int i = 0; i < n; ++i)
      in->data.int8[i] = quantize<int8_t>(features[i], edgepack_model::kInputScale,
                                          edgepack_model::kInputZeroPoint);
  } else if (in->type == kTfLiteUInt8) {
    for (int i = 0; i < n; ++i)
      in->data.uint8[i] = quantize<uint8_t>(features[i], edgepack_model::kInputScale,
                                            edgepack_model::kInputZeroPoint);
  } else {
    std::memcpy(in->data.f, features, n * sizeof(float));
  }
  const uint32_t t0 = micros_now();
  if (g_interpreter->Invoke() != kTfLiteOk) return -1;
  const uint32_t us = micros_now() - t0;

  TfLiteTensor* out = g_interpreter->output(0);
  int best = -1;
  float best_score = -INFINITY;
  for (int i = 0; i < edgepack_model::kOutputElements; ++i) {
    float v = out->type == kTfLiteInt8
                  ? (out->data.int8[i] - edgepack_model::kOutputZeroPoint) *
                        edgepack_model::kOutputScale
              : out->type == kTfLiteUInt8
                  ? (out->data.uint8[i] - edgepack_model::kOutputZeroPoint) *
                        edgepack_model::kOutputScale
                  : out->data.f[i];
    if (v > best_score) {
      best_score = v;
      best = i;
    }
  }
  report(best, best_score, us);
  return best;
}

#ifndef EDGEPACK_NO_MAIN
// Bare-metal / Arduino-style loop. On ESP-IDF, call these from app_main() instead (README.md).
int main() {
  if (edgepack_model_setup() != 0) return 1;
  static float features[edgepack_model::kInputElements];
  for (;;) {
    read_sensor(features, edgepack_model::kInputElements);
    edgepack_model_infer(features);
  }
}
#endif
