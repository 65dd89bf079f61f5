// Argument helpers for the binding: type checks with messages that name the field.
#pragma once
#include <napi.h>

#include <cmath>
#include <string>
#include <vector>

namespace della_binding {

// The most bytes one Uint8Array holds in Node 20. An external buffer (a map's view, a
// staging buffer from aligned_alloc) longer than that aborted the process (a double
// free) instead of throwing: N-API makes external ArrayBuffers as Buffers. Longer bytes
// are DataViews over memory V8 allocates itself.
constexpr uint64_t kMaxTypedArrayBytes = uint64_t{1} << 32;

inline Napi::Value field(const Napi::Object& o, const char* key, const std::string& where) {
  if (!o.Has(key)) throw Napi::TypeError::New(o.Env(), where + "." + key + " is missing");
  return o.Get(key);
}

inline double number_field(const Napi::Object& o, const char* key, const std::string& where) {
  Napi::Value v = field(o, key, where);
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), where + "." + key + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

inline int64_t integer_field(const Napi::Object& o, const char* key, const std::string& where, double lo,
                             double hi) {
  const double d = number_field(o, key, where);
  if (!(d >= lo && d <= hi) || std::floor(d) != d)
    throw Napi::RangeError::New(o.Env(), where + "." + key + " must be an integer in [" +
                                             std::to_string(static_cast<long long>(lo)) + ", " +
                                             std::to_string(static_cast<long long>(hi)) + "]");
  return static_cast<int64_t>(d);
}

inline bool bool_field(const Napi::Object& o, const char* key, const std::string& where) {
  Napi::Value v = field(o, key, where);
  if (!v.IsBoolean()) throw Napi::TypeError::New(o.Env(), where + "." + key + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

// A 64-bit digest as 16 lowercase hex digits, as `verify` reads them.
inline Napi::String hex64(Napi::Env env, uint64_t h) {
  char hex[16];
  for (int i = 0; i < 16; ++i) hex[i] = "0123456789abcdef"[(h >> (60 - 4 * i)) & 15];
  return Napi::String::New(env, hex, 16);
}

inline Napi::Object object_field(const Napi::Object& o, const char* key, const std::string& where) {
  Napi::Value v = field(o, key, where);
  if (!v.IsObject()) throw Napi::TypeError::New(o.Env(), where + "." + key + " must be an object");
  return v.As<Napi::Object>();
}

inline Napi::Array array_field(const Napi::Object& o, const char* key, const std::string& where) {
  Napi::Value v = field(o, key, where);
  if (!v.IsArray()) throw Napi::TypeError::New(o.Env(), where + "." + key + " must be an array");
  return v.As<Napi::Array>();
}

struct ByteSpan {
  uint8_t* data;
  size_t length;
};

// Any ArrayBufferView (Buffer, Uint8Array, Float32Array, ...) as raw bytes, zero-copy.
inline ByteSpan bytes_field(const Napi::Object& o, const char* key, const std::string& where) {
  Napi::Value v = field(o, key, where);
  if (!v.IsTypedArray() && !v.IsDataView())
    throw Napi::TypeError::New(o.Env(), where + "." + key + " must be a typed array or Buffer");
  if (v.IsDataView()) {
    Napi::DataView dv = v.As<Napi::DataView>();
    return {static_cast<uint8_t*>(dv.ArrayBuffer().Data()) + dv.ByteOffset(), dv.ByteLength()};
  }
  Napi::TypedArray ta = v.As<Napi::TypedArray>();
  return {static_cast<uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset(), ta.ByteLength()};
}

// A Uint8Array or a DataView (what allocStaging hands out) as raw bytes; false otherwise.
inline bool byte_view(const Napi::Value& v, ByteSpan& out) {
  if (v.IsDataView()) {
    Napi::DataView dv = v.As<Napi::DataView>();
    out = {static_cast<uint8_t*>(dv.ArrayBuffer().Data()) + dv.ByteOffset(), dv.ByteLength()};
    return true;
  }
  if (v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == napi_uint8_array) {
    Napi::Uint8Array a = v.As<Napi::Uint8Array>();
    out = {a.Data(), a.ByteLength()};
    return true;
  }
  return false;
}

inline std::vector<int64_t> shape_field(const Napi::Object& o, const char* key, const std::string& where) {
  Napi::Array a = array_field(o, key, where);
  std::vector<int64_t> shape(a.Length());
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value d = a.Get(i);
    const double v = d.IsNumber() ? d.As<Napi::Number>().DoubleValue() : -1;
    if (!(v >= 0 && v <= 9007199254740991.0) || std::floor(v) != v)
      throw Napi::RangeError::New(o.Env(), where + "." + key + "[" + std::to_string(i) +
                                               "] must be a non-negative integer");
    shape[i] = static_cast<int64_t>(v);
  }
  return shape;
}

}  // namespace della_binding
