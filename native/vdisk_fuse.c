/*
 * The FUSE transport: a libfuse3 low-level session driven from Node's own
 * event loop. This file holds the session's lifecycle (mount, the uv_poll
 * loop, stop, close); vdisk_ops.c hands each request to JS, and vdisk_reply.c
 * holds the request handles and the reply*() functions.
 *
 * Transport only, no policy. The session fd is watched with uv_poll on the
 * main thread (as QEMU's FUSE export watches it from its AioContext), each
 * request is handed to a JS function synchronously, and JS answers later with
 * one of the reply*() functions. There are no FUSE worker threads, so no
 * thread hop per request and no locking.
 *
 * Invariants:
 *  - every request handed to JS is answered exactly once: by JS (the TS wrapper
 *    guarantees it), by a reply*() call whose arguments cannot be converted
 *    (it answers EIO, then throws), or by C itself (EIO) if calling into JS
 *    fails; a second reply is refused with an exception, never sent;
 *  - no double from JS is cast to an integer type unless it is an integer in
 *    that type's range (casting NaN or 1e30 to off_t is undefined behaviour);
 *  - write data lives in libfuse's receive buffer, which the next receive
 *    overwrites, so it reaches JS in a buffer of its own (vdisk_ops.c);
 *  - a fuse_req_t travels to JS inside a small handle (an external value) that
 *    remembers whether it was answered; JS's garbage collector frees it.
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "vdisk_session.h"

/* Tell JS the session is over (unmounted, or the connection was aborted). */
static void notify_exit(vd_session *s, int err) {
  napi_env env = s->env;
  napi_value fn, global, result, arg;
  if (s->on_exit == NULL) return;
  if (napi_get_reference_value(env, s->on_exit, &fn) != napi_ok || fn == NULL) return;
  if (napi_get_global(env, &global) != napi_ok) return;
  arg = num(env, err);
  if (napi_call_function(env, global, fn, 1, &arg, &result) != napi_ok) {
    bool pending = false;
    napi_value exc;
    napi_is_exception_pending(env, &pending);
    if (pending) napi_get_and_clear_last_exception(env, &exc);
  }
}

/* Bound the work done per wake-up so timers and completions still get their turn. */
#define MAX_REQUESTS_PER_WAKEUP 64

static void on_readable(uv_poll_t *handle, int status, int events) {
  (void)events;
  vd_session *s = handle->data;
  napi_env env = s->env;
  napi_handle_scope scope;
  napi_callback_scope cb_scope;
  napi_value resource;
  int exit_err = 0, stop = 0;

  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  /* One callback scope per wake-up: promise continuations started by the
   * handlers run when it closes, as after any libuv callback. */
  if (napi_get_reference_value(env, s->resource, &resource) != napi_ok ||
      napi_open_callback_scope(env, resource, s->async_context, &cb_scope) != napi_ok) {
    napi_close_handle_scope(env, scope);
    return;
  }
  if (status < 0) {
    exit_err = EIO;
    stop = 1;
  }
  for (int i = 0; !stop && i < MAX_REQUESTS_PER_WAKEUP; i++) {
    int res = fuse_session_receive_buf(s->se, &s->buf);
    if (res == -EAGAIN || res == -EINTR) break;
    if (res <= 0) {
      if (!fuse_session_exited(s->se)) exit_err = res < 0 ? -res : EIO;
      stop = 1;
      break;
    }
    fuse_session_process_buf(s->se, &s->buf);
    if (fuse_session_exited(s->se)) stop = 1;
  }
  if (stop && s->polling) {
    uv_poll_stop(&s->poll);
    s->polling = 0;
    notify_exit(s, exit_err);
  }
  napi_close_callback_scope(env, cb_scope);
  napi_close_handle_scope(env, scope);
}

static void on_poll_closed(uv_handle_t *handle) {
  vd_session *s = handle->data;
  napi_env env = s->env;
  /* The poll handle is closed, so the fd may go now. If the kernel already ended
   * the connection this only closes the fd; otherwise it detaches the mount. */
  fuse_session_unmount(s->se);
  fuse_session_destroy(s->se);
  free(s->buf.mem);
  for (int i = 0; i < OP_COUNT; i++)
    if (s->handlers[i]) napi_delete_reference(env, s->handlers[i]);
  if (s->on_exit) napi_delete_reference(env, s->on_exit);
  if (s->resource) napi_delete_reference(env, s->resource);
  napi_async_destroy(env, s->async_context);
  free(s);
}

static int append_opt(char *dst, size_t cap, const char *opt) {
  size_t len = strlen(dst);
  int n = snprintf(dst + len, cap - len, "%s%s", len ? "," : "", opt);
  return n < 0 || (size_t)n >= cap - len ? -1 : 0;
}

static int get_named_string(napi_env env, napi_value obj, const char *name, char *out, size_t cap) {
  napi_value v;
  napi_valuetype t;
  out[0] = 0;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok) return -1;
  if (napi_typeof(env, v, &t) != napi_ok) return -1;
  if (t == napi_undefined) return 0;
  return get_string(env, v, out, cap) ? 0 : -1;
}

static int get_named_uint(napi_env env, napi_value obj, const char *name, uint32_t *out) {
  napi_value v;
  napi_valuetype t;
  *out = 0;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok) return -1;
  if (napi_typeof(env, v, &t) != napi_ok) return -1;
  if (t == napi_undefined) return 0;
  return napi_get_value_uint32(env, v, out) == napi_ok ? 0 : -1;
}

/*
 * mount(mountpoint, options, handlers, onExit) -> session handle
 * options: { fsOptions: "fsname=..,ro,allow_other,...", maxWrite, maxReadahead }
 * handlers: { getattr(req), read(req, offset, size), ... } — missing ones answer ENOSYS.
 */
static napi_value js_mount(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4], result, resource_name;
  char mountpoint[PATH_MAX], fs_options[2048], opts[2300];
  vd_session *s;
  uv_loop_t *loop;
  struct fuse_args args = FUSE_ARGS_INIT(0, NULL);

  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4) {
    napi_throw_type_error(env, "ERR_VDISK_ARG", "mount(mountpoint, options, handlers, onExit)");
    return NULL;
  }
  if (!get_string(env, argv[0], mountpoint, sizeof mountpoint)) {
    napi_throw_type_error(env, "ERR_VDISK_ARG", "mount: the mountpoint must be a string shorter than PATH_MAX");
    return NULL;
  }
  if (get_named_string(env, argv[1], "fsOptions", fs_options, sizeof fs_options) < 0) {
    napi_throw_type_error(env, "ERR_VDISK_ARG", "options.fsOptions must be a short string");
    return NULL;
  }
  s = calloc(1, sizeof *s);
  if (!s) return throw_errno(env, ENOMEM, "calloc");
  s->env = env;
  if (get_named_uint(env, argv[1], "maxWrite", &s->max_write) < 0 ||
      get_named_uint(env, argv[1], "maxReadahead", &s->max_readahead) < 0) {
    free(s);
    napi_throw_type_error(env, "ERR_VDISK_ARG", "options.maxWrite/maxReadahead must be numbers");
    return NULL;
  }
  for (int i = 0; i < OP_COUNT; i++) {
    napi_value fn;
    napi_valuetype t;
    if (napi_get_named_property(env, argv[2], op_names[i], &fn) != napi_ok ||
        napi_typeof(env, fn, &t) != napi_ok)
      goto fail_js;
    if (t == napi_function && napi_create_reference(env, fn, 1, &s->handlers[i]) != napi_ok)
      goto fail_js;
  }
  if (napi_create_reference(env, argv[3], 1, &s->on_exit) != napi_ok) goto fail_js;
  if (napi_create_object(env, &result) != napi_ok ||
      napi_create_reference(env, result, 1, &s->resource) != napi_ok ||
      napi_create_string_utf8(env, "vdisk:fuse", NAPI_AUTO_LENGTH, &resource_name) != napi_ok ||
      napi_async_init(env, result, resource_name, &s->async_context) != napi_ok)
    goto fail_js;

  opts[0] = 0;
  if (fs_options[0] && append_opt(opts, sizeof opts, fs_options) < 0) goto fail_js;
  if (fuse_opt_add_arg(&args, "vdisk") < 0 || fuse_opt_add_arg(&args, "-o") < 0 ||
      fuse_opt_add_arg(&args, opts[0] ? opts : "default_permissions") < 0) {
    fuse_opt_free_args(&args);
    goto fail_js;
  }
  s->se = fuse_session_new(&args, &ll_ops, sizeof ll_ops, s);
  fuse_opt_free_args(&args);
  if (!s->se) {
    napi_throw_error(env, "ERR_VDISK_FUSE_OPTIONS", "libfuse rejected the session options");
    goto fail_cleanup;
  }
  if (fuse_session_mount(s->se, mountpoint) != 0) {
    int err = errno ? errno : EIO;
    fuse_session_destroy(s->se);
    s->se = NULL;
    throw_errno(env, err, "fuse mount");
    goto fail_cleanup;
  }
  {
    int fd = fuse_session_fd(s->se);
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ||
        napi_get_uv_event_loop(env, &loop) != napi_ok || uv_poll_init(loop, &s->poll, fd) != 0) {
      fuse_session_unmount(s->se);
      fuse_session_destroy(s->se);
      s->se = NULL;
      throw_errno(env, EIO, "uv_poll_init");
      goto fail_cleanup;
    }
    s->poll.data = s;
    if (uv_poll_start(&s->poll, UV_READABLE, on_readable) != 0) {
      s->polling = 0;
      s->closing = 1;
      uv_close((uv_handle_t *)&s->poll, on_poll_closed);
      throw_errno(env, EIO, "uv_poll_start");
      return NULL;
    }
    s->polling = 1;
  }
  {
    napi_value handle;
    NAPI_CALL(env, napi_create_external(env, s, NULL, NULL, &handle));
    return handle;
  }

fail_js:
  throw_last_error(env);
fail_cleanup:
  for (int i = 0; i < OP_COUNT; i++)
    if (s->handlers[i]) napi_delete_reference(env, s->handlers[i]);
  if (s->on_exit) napi_delete_reference(env, s->on_exit);
  if (s->resource) napi_delete_reference(env, s->resource);
  if (s->async_context) napi_async_destroy(env, s->async_context);
  free(s);
  return NULL;
}

/* The session handle a call's first argument carries; NULL with an exception pending if it is not one. */
static vd_session *session_arg(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  void *p = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok ||
      napi_get_value_external(env, argv[0], &p) != napi_ok || p == NULL) {
    throw_last_error(env);
    return NULL;
  }
  return p;
}

/* stop(session): take no new requests; those already handed to JS can still be
 * answered. Requests left in the kernel's queue fail once the session closes. */
static napi_value js_stop(napi_env env, napi_callback_info info) {
  vd_session *s = session_arg(env, info);
  if (!s) return NULL;
  if (s->polling && !s->closing) uv_poll_stop(&s->poll);
  s->polling = 0;
  return NULL;
}

/* close(session): stop serving and release everything. Aborts the connection if
 * the mount is still there: callers drain and detach first for a clean stop. */
static napi_value js_close(napi_env env, napi_callback_info info) {
  vd_session *s = session_arg(env, info);
  if (!s || s->closing) return NULL;
  s->closing = 1;
  if (s->polling) uv_poll_stop(&s->poll);
  s->polling = 0;
  uv_close((uv_handle_t *)&s->poll, on_poll_closed);
  return NULL;
}

napi_status vdisk_register_fuse(napi_env env, napi_value exports) {
  static const vdisk_function fns[] = {
      {"mount", js_mount},
      {"close", js_close},
      {"stop", js_stop},
  };
  return vdisk_register_functions(env, exports, fns, sizeof fns / sizeof fns[0]);
}
