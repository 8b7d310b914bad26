// The platform-free core: plain Kotlin/JVM, no Android dependency. CI compiles and tests it without
// Gradle (core/run_tests.sh); here `./gradlew :core:runCoreTests` runs the same tests.
plugins {
    id("org.jetbrains.kotlin.jvm")
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    testImplementation(kotlin("test"))
}

// The tests carry their own small runner (TestMain.kt): CI has no JUnit, only kotlin-test's assertions.
// They read a real bundle and fixtures: see tests/test_android_core.py for how those are made.
tasks.register<JavaExec>("runCoreTests") {
    group = "verification"
    description = "Runs the core tests (needs FASP_TEST_BUNDLE, FASP_TEST_DAMAGED_BUNDLE, FASP_TEST_FIXTURES)"
    val test = sourceSets["test"]
    classpath = test.runtimeClasspath
    mainClass.set("org.faspedge.core.TestMainKt")
}
