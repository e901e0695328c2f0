{
  "targets": [
    {
      "target_name": "vdisk_fuse",
      "sources": ["native/vdisk_fuse.c", "native/vdisk_peercred.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "<!@(pkg-config --cflags fuse3)"],
      "libraries": ["<!@(pkg-config --libs fuse3)"]
    }
  ]
}
