/* Peer credentials of a UNIX socket (SO_PEERCRED), which Node has no API for. */
#ifndef VDISK_PEERCRED_H
#define VDISK_PEERCRED_H
#include <node_api.h>

/* Adds peerCredentials() to the addon's exports. */
napi_status vdisk_register_peercred(napi_env env, napi_value exports);

#endif
