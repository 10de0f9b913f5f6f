#!/usr/bin/env node
// Drive onevlm's operator's page in headless Chromium (playwright-core, Debian's /usr/bin/chromium;
// no browser is ever downloaded) and report, as JSON on stdout, what each page shows:
//
//   node tests/js/dashboard_e2e.mjs SPEC.json
//
// SPEC.json (written by tests/test_dashboard_e2e.py):
//   {
//     "baseUrl": "http://127.0.0.1:PORT",
//     "chromium": "/usr/bin/chromium",
//     "userDataDir": "/tmp/.../chromium-profile",   // fresh, empty
//     "timeoutMs": 20000,
//     "review": {"series": "<Series UID>", "answer": "card:MODEL_05", "reviewer": "AB", "comment": "..."},
//     "decisionGroup": "<group key>",               // a study whose decision page is opened from the list
//     "screenshots": {"overview": [...], "studies": [...], "decision": [...], "review": [...],
//                     "reviewed": [...], "calibration": [...]}
//   }
//
// The browser clicks and submits as a person would: the study is opened from the list, the review
// answer is chosen in the queue's form and submitted with its button. Every wait is on a selector
// or a navigation; nothing sleeps. Exit status: 0 when every step completed (the Python test judges
// the content), 1 when a step failed (the report says which), 2 on a usage error. Research use only.

import fs from "node:fs";
import process from "node:process";

import { launchChromium, stepTimer, writeScreenshots } from "./browser_session.mjs";

async function shoot(page, paths) {
  writeScreenshots(await page.screenshot({ fullPage: true }), paths);
}

const text = (page, selector) => page.locator(selector).first().innerText();

async function main(argv) {
  if (argv.length !== 1) {
    process.stderr.write("usage: node dashboard_e2e.mjs SPEC.json\n");
    return 2;
  }
  const spec = JSON.parse(fs.readFileSync(argv[0], "utf8"));
  const shots = spec.screenshots ?? {};
  const report = { ok: false, step: null, pageErrors: [], failedResponses: [], timingsMs: {} };
  const started = Date.now();
  const step = stepTimer(report);

  step("launch chromium");
  const context = await launchChromium(spec, { viewport: { width: 1400, height: 900 }, timeoutMs: spec.timeoutMs ?? 20000 });
  let page;
  try {
    page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(spec.timeoutMs ?? 20000);
    page.on("pageerror", (error) => report.pageErrors.push(String(error).slice(0, 500)));
    page.on("response", (response) => {
      if (response.status() >= 400) report.failedResponses.push(`${response.status()} ${response.url()}`);
    });

    step("overview");
    await page.goto(`${spec.baseUrl}/`);
    await page.locator("#counts").waitFor();
    report.overview = {
      title: await page.title(),
      received: await text(page, "#count-received"),
      processed: await text(page, "#count-processed"),
      failed: await text(page, "#count-failed"),
      quarantined: await text(page, "#count-quarantine_files"),
      chartHasBars: await page.locator("#hourly svg").count(),
      calibration: await text(page, "#calibration"),
      calibratedShare: await text(page, "#calibrated-share"),
      drift: await page.locator("#drift-warning").count(),
      vlmCalls: await text(page, "#count-vlm_calls"),
      seriesWithoutVlm: await text(page, "#count-series_without_vlm"),
      disagreements: await text(page, "#count-disagreements"),
    };
    await shoot(page, shots.overview);

    step("studies");
    await page.getByRole("link", { name: "Studies", exact: true }).click();
    await page.locator("#studies").waitFor();
    report.studies = await page.locator("tr.study").evaluateAll((rows) =>
      rows.map((row) => ({
        group: row.dataset.group,
        outcome: row.dataset.outcome,
        cells: Array.from(row.querySelectorAll("td"), (cell) => cell.innerText.trim()),
        viewer: row.querySelector("td:last-child a")?.getAttribute("href") ?? null,
      })),
    );
    await shoot(page, shots.studies);

    step("filter by outcome");
    await page.locator("#outcome-filter").selectOption("review");
    await Promise.all([page.waitForURL(/outcome=review/), page.locator("#filter button").click()]);
    report.filteredOutcomes = await page.locator("tr.study").evaluateAll((rows) => rows.map((r) => r.dataset.outcome));

    step("decision page");
    await page.goto(`${spec.baseUrl}/studies`);
    await Promise.all([
      page.waitForURL(new RegExp(`/studies/${spec.decisionGroup.replaceAll(".", "\\.")}$`)),
      page.locator(`tr.study[data-group="${spec.decisionGroup}"] a`).first().click(),
    ]);
    await page.locator("table.stages").first().waitFor();
    report.decision = {
      stages: await page.locator("table.stages tr.stage").count(),
      text: (await page.locator("main").innerText()).slice(0, 4000),
      viewerLink: await page.locator("#viewer-link").getAttribute("href"),
    };
    await shoot(page, shots.decision);

    step("review queue");
    await page.getByRole("link", { name: "Review queue" }).click();
    await page.locator("#queue").waitFor();
    report.queueBefore = await page.locator("tr.case").evaluateAll((rows) => rows.map((r) => r.dataset.series));
    await shoot(page, shots.review);

    step("record an answer");
    const form = page.locator(`form.review[data-series="${spec.review.series}"]`).first();
    await form.locator("select[name=answer]").selectOption(spec.review.answer);
    await form.locator("input[name=reviewer]").fill(spec.review.reviewer);
    await form.locator("input[name=comment]").fill(spec.review.comment ?? "");
    await Promise.all([page.waitForURL(/recorded=1/), form.getByRole("button", { name: "Record" }).click()]);
    await page.locator("#flash").waitFor();
    report.afterReview = {
      flash: await text(page, "#flash"),
      queue: await page.locator("tr.case").evaluateAll((rows) => rows.map((r) => r.dataset.series)),
      answered: await page.locator("tr.answered").evaluateAll((rows) => rows.map((r) => r.innerText)),
    };
    await shoot(page, shots.reviewed);

    step("calibration health");
    await page.getByRole("link", { name: "Calibration health" }).click();
    await page.locator("#checks").waitFor();
    report.calibration = {
      verdict: await text(page, "#drift-verdict"),
      checks: await page.locator("tr.check").evaluateAll((rows) => rows.map((r) => r.innerText)),
      reliability: await page.locator("#reliability svg").count(),
    };
    await shoot(page, shots.calibration);

    step("done");
    report.ok = true;
  } catch (error) {
    report.error = `${error.name}: ${error.message}`.slice(0, 2000);
    if (page) {
      try {
        report.bodyText = (await page.locator("body").innerText()).slice(0, 3000);
      } catch (inner) {
        report.bodyTextError = String(inner);
      }
    }
  } finally {
    report.timingsMs.total = Date.now() - started;
    await context.close().catch(() => {});
  }
  process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  return report.ok ? 0 : 1;
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (error) {
  process.stderr.write(`dashboard_e2e.mjs: ${error.stack || error}\n`);
  process.exitCode = 1;
}
