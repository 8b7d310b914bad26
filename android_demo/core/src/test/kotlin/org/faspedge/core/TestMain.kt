package org.faspedge.core

import java.io.File
import kotlin.system.exitProcess

/** Marks a test method; [TestMain] runs every one (JUnit is not available to CI here, kotlin-test's asserts are). */
@Retention(AnnotationRetention.RUNTIME)
@Target(AnnotationTarget.FUNCTION)
annotation class Test

/** What the Python side of the test run hands over (see tests/test_android_core.py). */
object Fixtures {
    private fun env(name: String): String = System.getenv(name)
        ?: throw IllegalStateException("$name is not set; run these tests through android_demo/core/run_tests.sh")

    val bundle: File get() = File(env("FASP_TEST_BUNDLE"))
    val damagedBundle: File get() = File(env("FASP_TEST_DAMAGED_BUNDLE"))
    val data: JsonView by lazy { JsonView(Json.parse(File(env("FASP_TEST_FIXTURES")).readText())) }
    val scratch: File by lazy { kotlin.io.path.createTempDirectory("faspedge-core-test").toFile() }
}

val TEST_CLASSES = listOf(JsonTest::class, BundleTest::class, BackendTest::class, StatsTest::class,
    PromptTest::class, TokenizerTest::class, GeneratorTest::class)

fun main(args: Array<String>) {
    var passed = 0
    val failed = ArrayList<String>()
    for (k in TEST_CLASSES) {
        val cls = k.java
        for (m in cls.declaredMethods.filter { it.isAnnotationPresent(Test::class.java) }.sortedBy { it.name }) {
            val name = "${cls.simpleName}.${m.name}"
            if (args.isNotEmpty() && args.none { it in name }) continue
            try {
                m.invoke(cls.getDeclaredConstructor().newInstance())
                passed++
                println("PASS $name")
            } catch (e: java.lang.reflect.InvocationTargetException) {
                val cause = e.targetException
                failed.add(name)
                println("FAIL $name: ${cause::class.simpleName}: ${cause.message}")
                cause.stackTrace.take(6).forEach { println("    at $it") }
            }
        }
    }
    Fixtures.scratch.deleteRecursively()
    println("${passed} passed, ${failed.size} failed")
    exitProcess(if (failed.isEmpty() && passed > 0) 0 else 1)
}
