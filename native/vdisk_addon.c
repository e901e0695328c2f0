/*
 * vdisk native addon: a libfuse3 low-level session driven from Node's own
 * event loop (vdisk_fuse.c and vdisk_ops.c, answered through vdisk_reply.c), the host-file
 * calls Node lacks (vdisk_host.c) and peer credentials of the control socket
 * (vdisk_peercred.c). This file holds the N-API helpers they share and the
 * module's entry point.
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>
#include "vdisk_addon.h"
#include "vdisk_peercred.h"

/* ---- N-API error checking (in the style of node's js-native-api common.h) ---- */

void throw_last_error(napi_env env) {
  const napi_extended_error_info *info = NULL;
  bool pending = false;
  napi_get_last_error_info(env, &info);
  napi_is_exception_pending(env, &pending);
  if (!pending) {
    napi_throw_error(env, "ERR_VDISK_NAPI",
                     info && info->error_message ? info->error_message : "N-API call failed");
  }
}

/* Throw an Error whose .code is the errno name ("ENOENT") and .errno is -errno, like Node's fs. */
napi_value throw_errno(napi_env env, int err, const char *syscall) {
  napi_value code, msg, error, errnum;
  char text[256];
  snprintf(text, sizeof text, "%s: %s", syscall, strerror(err));
  if (napi_create_string_utf8(env, uv_err_name(-err), NAPI_AUTO_LENGTH, &code) != napi_ok ||
      napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg) != napi_ok ||
      napi_create_error(env, code, msg, &error) != napi_ok ||
      napi_create_int32(env, -err, &errnum) != napi_ok ||
      napi_set_named_property(env, error, "errno", errnum) != napi_ok) {
    throw_last_error(env);
    return NULL;
  }
  napi_throw(env, error);
  return NULL;
}

/* ---- argument helpers ---- */

/* A JS number that is an integer in [lo, hi) (see is_integer_in); false for anything else. */
bool get_integer(napi_env env, napi_value v, double lo, double hi, int64_t *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || !is_integer_in(d, lo, hi)) return false;
  *out = (int64_t)d;
  return true;
}

/* A JS string into out[cap]; false if it is not a string or does not fit. */
bool get_string(napi_env env, napi_value v, char *out, size_t cap) {
  size_t len;
  if (napi_get_value_string_utf8(env, v, out, cap, &len) != napi_ok) return false;
  return len + 1 < cap;
}

/* The first `count` elements of a JS array, as numbers; false if it is not an array of numbers. */
bool get_numbers(napi_env env, napi_value array, double *out, uint32_t count) {
  bool is_array = false;
  uint32_t len;
  if (napi_is_array(env, array, &is_array) != napi_ok || !is_array ||
      napi_get_array_length(env, array, &len) != napi_ok || len < count)
    return false;
  for (uint32_t i = 0; i < count; i++) {
    napi_value v;
    if (napi_get_element(env, array, i, &v) != napi_ok || napi_get_value_double(env, v, &out[i]) != napi_ok)
      return false;
  }
  return true;
}

/* An array of Buffers as an iovec (at most MAX_REPLY_IOV): NULL, or what is wrong with it. */
const char *get_iovec(napi_env env, napi_value array, struct iovec *iov, uint32_t *count) {
  bool is_array = false;
  if (napi_is_array(env, array, &is_array) != napi_ok || !is_array ||
      napi_get_array_length(env, array, count) != napi_ok)
    return "buffers must be an array of Buffers";
  if (*count > MAX_REPLY_IOV) return "too many buffers in one request";
  for (uint32_t i = 0; i < *count; i++) {
    napi_value b;
    if (napi_get_element(env, array, i, &b) != napi_ok ||
        napi_get_buffer_info(env, b, &iov[i].iov_base, &iov[i].iov_len) != napi_ok)
      return "buffers must be an array of Buffers";
  }
  return NULL;
}

napi_status vdisk_register_functions(napi_env env, napi_value exports, const vdisk_function *fns, size_t count) {
  for (size_t i = 0; i < count; i++) {
    napi_value fn;
    napi_status status = napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &fn);
    if (status == napi_ok) status = napi_set_named_property(env, exports, fns[i].name, fn);
    if (status != napi_ok) return status;
  }
  return napi_ok;
}

static napi_value init(napi_env env, napi_value exports) {
  NAPI_CALL(env, vdisk_register_fuse(env, exports));
  NAPI_CALL(env, vdisk_register_replies(env, exports));
  NAPI_CALL(env, vdisk_register_host(env, exports));
  NAPI_CALL(env, vdisk_register_peercred(env, exports));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
