{
  "targets": [
    {
      "target_name": "vdisk_fuse",
      "sources": ["native/vdisk_addon.c", "native/vdisk_fuse.c", "native/vdisk_ops.c", "native/vdisk_reply.c", "native/vdisk_host.c", "native/vdisk_peercred.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "<!@(pkg-config --cflags fuse3)"],
      "libraries": ["<!@(pkg-config --libs fuse3)"]
    }
  ]
}
