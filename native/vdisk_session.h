/*
 * The FUSE session shared by its two halves: its lifecycle (mount, the uv_poll
 * loop, stop, close: vdisk_fuse.c) and the low-level ops that hand each
 * request to JS (vdisk_ops.c).
 */
#ifndef VDISK_SESSION_H
#define VDISK_SESSION_H
#include <uv.h>
#include "vdisk_addon.h"

/* The operations JS may handle, in the order of op_names. */
enum {
  OP_GETATTR,
  OP_SETATTR,
  OP_OPEN,
  OP_RELEASE,
  OP_READ,
  OP_WRITE,
  OP_FLUSH,
  OP_FSYNC,
  OP_FALLOCATE,
  OP_LSEEK,
  OP_STATFS,
  OP_COUNT
};

/* The name of each operation's handler in the object mount() takes. */
extern const char *const op_names[OP_COUNT];

typedef struct {
  napi_env env;
  struct fuse_session *se;
  uv_poll_t poll;
  struct fuse_buf buf;
  napi_ref handlers[OP_COUNT];
  napi_ref on_exit;
  napi_ref resource;
  napi_async_context async_context;
  uint32_t max_write;
  uint32_t max_readahead;
  int polling;
  int closing;
} vd_session;

/* The ops libfuse calls; each hands its request to the JS handler (vdisk_ops.c). */
extern const struct fuse_lowlevel_ops ll_ops;

static inline napi_value num(napi_env env, double d) {
  napi_value v = NULL;
  napi_create_double(env, d, &v);
  return v;
}

#endif
