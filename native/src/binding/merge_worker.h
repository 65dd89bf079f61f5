// mergeBatch(batch): runs a batch of merge and copy tasks on the addon's thread pool
// and resolves to per-merge statistics. The JS thread only converts arguments.
#pragma once
#include <napi.h>

namespace della_binding {

Napi::Value MergeBatch(const Napi::CallbackInfo& info);
Napi::Value DotBatch(const Napi::CallbackInfo& info);

}  // namespace della_binding
