#!/usr/bin/env bash
# Compile the platform-free core module and its tests with kotlinc (no Gradle, no Maven) and run them on
# the JVM. CI calls this through tests/test_android_core.py, which first writes a real bundle and the
# fixtures the tests read (FASP_TEST_BUNDLE, FASP_TEST_DAMAGED_BUNDLE, FASP_TEST_FIXTURES).
#   KOTLINC   the compiler (default: .tools/kotlin from scripts/setup.sh, npm package kotlin-compiler)
#   extra arguments select tests by name, e.g. `run_tests.sh BundleTest`
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
KOTLINC="${KOTLINC:-$ROOT/.tools/kotlin/node_modules/kotlin-compiler/bin/kotlinc}"
if [ ! -x "$KOTLINC" ]; then
    echo "run_tests.sh: no Kotlin compiler at $KOTLINC; run scripts/setup.sh (it needs npm and a JDK 17) or set KOTLINC" >&2
    exit 3
fi
LIB="$(cd "$(dirname "$KOTLINC")/../lib" && pwd)"
BUILD="$HERE/build/ci"
mkdir -p "$BUILD"
mapfile -t SOURCES < <(find "$HERE/src/main/kotlin" "$HERE/src/test/kotlin" -name '*.kt' | sort)
KEY="$(cat "${SOURCES[@]}" | sha256sum | cut -c1-16)"
JAR="$BUILD/core-tests-$KEY.jar"
if [ ! -f "$JAR" ]; then  # compiled once per version of the sources
    rm -f "$BUILD"/core-tests-*.jar
    "$KOTLINC" -jvm-target 17 -nowarn -cp "$LIB/kotlin-test.jar" -d "$BUILD/tmp-$$.jar" "${SOURCES[@]}"
    mv "$BUILD/tmp-$$.jar" "$JAR"
fi
exec java -cp "$JAR:$LIB/kotlin-stdlib.jar:$LIB/kotlin-test.jar" org.faspedge.core.TestMainKt "$@"
