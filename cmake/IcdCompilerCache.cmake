# ccache, when installed and no launcher is set: a rebuild of what was built
# before, here or in another clone, is a cache hit (docs/build.md).
#  - base_dir = the source tree, hash_dir off: paths inside the tree and the
#    build directory's name do not enter the hash, so another folder hits;
#    -fdebug-prefix-map writes the tree's path as "." into the line tables,
#    so a hit carries no other clone's path.
#  - sloppiness pch_defines,time_macros: what ccache needs to cache
#    translation units that use a precompiled header (ccache's manual).
# ICD_CCACHE=OFF turns it off. ICD_REPO_ROOT: the tree's root, where a
# project below it (tests/fuzz) is configured on its own.
option(ICD_CCACHE "Compile through ccache when it is installed" ON)
find_program(ICD_CCACHE_PROGRAM ccache)
if(NOT ICD_REPO_ROOT)
  set(ICD_REPO_ROOT ${CMAKE_SOURCE_DIR})
endif()
if(ICD_CCACHE AND ICD_CCACHE_PROGRAM AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  set(CMAKE_CXX_COMPILER_LAUNCHER
    ${CMAKE_COMMAND} -E env
    CCACHE_BASEDIR=${ICD_REPO_ROOT}
    CCACHE_NOHASHDIR=1
    CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
    ${ICD_CCACHE_PROGRAM})
  add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-fdebug-prefix-map=${ICD_REPO_ROOT}=.>)
  message(STATUS "icd: compiling through ${ICD_CCACHE_PROGRAM}")
endif()
