#!/usr/bin/env node
// Read a DICOM SR (TID 1500 Imaging Measurement Report) with dcmjs and print what a
// JavaScript consumer sees as JSON on stdout:
//
//   node tests/js/parse_sr.mjs FILE.dcm
//
// - the document (SOP class, title, template, flags, series description);
// - the "Imaging Measurements" container's measurement groups, walked by hand: tracking
//   identifier and UID, qualitative evaluations (concept meaning -> value meaning), numeric
//   measurements (concept meaning -> value and unit), comments, SCOORD regions (graphic type,
//   data, referenced SOP class/instance/frames);
// - "dcmjsAdapter": what dcmjs's own TID 1500 reader
//   (adapters.Cornerstone3D.MeasurementReport.generateToolState) recovers from the file,
//   once as it ships and once with a getToolClass hook that offers a tool class per group.
//
// Exit status 0 on success, 2 on a usage error, 1 if the file cannot be read as an SR.
// Research use only.

import fs from "node:fs";
import process from "node:process";

import dcmjs from "dcmjs";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

const toArray = (value) => (value === undefined || value === null ? [] : Array.isArray(value) ? value : [value]);
const first = (value) => toArray(value)[0];

function code(sequence) {
  const item = first(sequence);
  if (!item) return null;
  return {
    value: item.CodeValue ?? item.LongCodeValue ?? item.URNCodeValue ?? null,
    scheme: item.CodingSchemeDesignator ?? null,
    meaning: item.CodeMeaning ?? null,
  };
}

const conceptMeaning = (item) => code(item.ConceptNameCodeSequence)?.meaning ?? null;
const conceptValue = (item) => code(item.ConceptNameCodeSequence)?.value ?? null;

function numericValue(item) {
  const measured = first(item.MeasuredValueSequence);
  if (!measured) return { value: null, unit: null };
  const raw = first(measured.NumericValue);
  return { value: raw === undefined ? null : Number(raw), unit: code(measured.MeasurementUnitsCodeSequence) };
}

function scoord(item) {
  const source = toArray(item.ContentSequence).find((child) => child.ValueType === "IMAGE");
  const reference = source ? first(source.ReferencedSOPSequence) : undefined;
  const data = Array.from(toArray(item.GraphicData), Number);
  const points = [];
  for (let i = 0; i + 1 < data.length; i += 2) points.push([data[i], data[i + 1]]);
  return {
    concept: conceptMeaning(item),
    graphicType: item.GraphicType ?? null,
    graphicData: data,
    points,
    referencedSOPClassUID: reference?.ReferencedSOPClassUID ?? null,
    referencedSOPInstanceUID: reference?.ReferencedSOPInstanceUID ?? null,
    referencedFrameNumbers: reference ? toArray(reference.ReferencedFrameNumber).map(Number) : [],
  };
}

function measurementGroup(group) {
  const result = {
    trackingIdentifier: null,
    trackingUID: null,
    findings: [],
    qualitativeEvaluations: {},
    codedItems: [],
    measurements: {},
    comments: [],
    algorithm: {},
    scoords: [],
    valueTypes: [],
  };
  for (const item of toArray(group.ContentSequence)) {
    const name = conceptMeaning(item);
    result.valueTypes.push(item.ValueType);
    switch (item.ValueType) {
      case "TEXT":
        if (name === "Tracking Identifier") result.trackingIdentifier = item.TextValue;
        else if (name === "Comment") result.comments.push(item.TextValue);
        else if (name?.startsWith("Algorithm")) {
          (result.algorithm[name] ??= []).push(item.TextValue);
        } else result.comments.push(`${name}: ${item.TextValue}`);
        break;
      case "UIDREF":
        if (name === "Tracking Unique Identifier") result.trackingUID = item.UID;
        break;
      case "CODE": {
        const value = code(item.ConceptCodeSequence);
        if (name === "Finding" || conceptValue(item) === "121071") result.findings.push(value);
        else {
          result.qualitativeEvaluations[name] = value?.meaning ?? null;
          // every coded item in order: a concept may repeat (the cards of a routed set)
          result.codedItems.push({ name, value: value?.value ?? null, meaning: value?.meaning ?? null });
        }
        break;
      }
      case "NUM":
        result.measurements[name] = numericValue(item);
        // TID 300 style: the region a measurement was inferred from sits below the NUM.
        for (const child of toArray(item.ContentSequence)) {
          if (child.ValueType === "SCOORD") result.scoords.push({ ...scoord(child), inferredFrom: name });
        }
        break;
      case "SCOORD":
        result.scoords.push(scoord(item));
        break;
      default:
        break;
    }
  }
  return result;
}

// dcmjs's own TID 1500 reader, as OHIF 2 used it. It picks a tool class by the tracking
// identifier ("Cornerstone3DTools@^0.1.0:<Tool>"), so free-text identifiers are skipped.
function dcmjsAdapter(dataset, groups) {
  const adapters = dcmjs.adapters?.Cornerstone3D;
  if (!adapters?.MeasurementReport?.generateToolState) return { available: false };
  const { MeasurementReport } = adapters;
  const imageIds = {};
  for (const group of groups) {
    for (const region of group.scoords) {
      if (region.referencedSOPInstanceUID) imageIds[region.referencedSOPInstanceUID] = `onevlm:${region.referencedSOPInstanceUID}`;
    }
  }
  const metadata = { get: (type) => (type === "imagePlaneModule" ? { frameOfReferenceUID: null } : undefined) };
  const toWorld = (_imageId, [x, y]) => [x, y, 0];
  const summarize = (state) =>
    Object.fromEntries(
      Object.entries(state).map(([tool, items]) => [
        tool,
        items.map((item) => ({
          sopInstanceUid: item.sopInstanceUid ?? null,
          finding: item.finding ? { value: item.finding.CodeValue, meaning: item.finding.CodeMeaning } : null,
          label: item.annotation?.metadata?.label ?? null,
          points: item.annotation?.data?.handles?.points?.length ?? null,
        })),
      ]),
    );
  const run = (hooks) => {
    // dcmjs logs every recovered tool to stdout; keep stdout for our JSON.
    const log = console.log;
    console.log = (...args) => console.error(...args);
    try {
      const state = MeasurementReport.generateToolState(dataset, imageIds, toWorld, metadata, hooks);
      const recovered = summarize(state);
      return { ok: true, recovered, count: Object.values(recovered).reduce((n, items) => n + items.length, 0) };
    } catch (error) {
      return { ok: false, error: `${error.name}: ${error.message}` };
    } finally {
      console.log = log;
    }
  };
  const asShipped = run({});
  // Offer PlanarFreehandROI (the closed-polyline tool) for every group with a POLYLINE.
  const freehand = MeasurementReport.CORNERSTONE_TOOL_CLASSES_BY_UTILITY_TYPE.PlanarFreehandROI;
  const withHook = run({
    getToolClass: (group) =>
      toArray(group.ContentSequence).some(
        (item) =>
          (item.ValueType === "SCOORD" && item.GraphicType === "POLYLINE") ||
          toArray(item.ContentSequence).some((child) => child.ValueType === "SCOORD"),
      )
        ? freehand
        : undefined,
  });
  return { available: true, asShipped, withPolylineHook: withHook };
}

function main(argv) {
  if (argv.length !== 1) {
    process.stderr.write("usage: node parse_sr.mjs FILE.dcm\n");
    return 2;
  }
  const bytes = fs.readFileSync(argv[0]);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const message = DicomMessage.readFile(buffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(message.dict);
  const meta = DicomMetaDictionary.naturalizeDataset(message.meta);
  if (dataset.ValueType !== "CONTAINER") throw new Error(`not an SR document: root value type ${dataset.ValueType}`);

  const root = toArray(dataset.ContentSequence);
  const imaging = root.find((item) => conceptMeaning(item) === "Imaging Measurements" || conceptValue(item) === "126010");
  const groups = toArray(imaging?.ContentSequence)
    .filter((item) => item.ValueType === "CONTAINER" && (conceptValue(item) === "125007" || conceptMeaning(item) === "Measurement Group"))
    .map(measurementGroup);

  const result = {
    transferSyntaxUID: meta.TransferSyntaxUID ?? null,
    sopClassUID: dataset.SOPClassUID,
    sopInstanceUID: dataset.SOPInstanceUID,
    studyInstanceUID: dataset.StudyInstanceUID,
    seriesInstanceUID: dataset.SeriesInstanceUID,
    modality: dataset.Modality,
    seriesDescription: dataset.SeriesDescription ?? null,
    documentTitle: code(dataset.ConceptNameCodeSequence),
    templateIdentifier: first(dataset.ContentTemplateSequence)?.TemplateIdentifier ?? null,
    completionFlag: dataset.CompletionFlag ?? null,
    verificationFlag: dataset.VerificationFlag ?? null,
    preliminaryFlag: dataset.PreliminaryFlag ?? null,
    procedureReported: root.filter((item) => conceptMeaning(item) === "Procedure reported").map((item) => code(item.ConceptCodeSequence)),
    observerContext: Object.fromEntries(
      root
        .filter((item) => item.RelationshipType === "HAS OBS CONTEXT")
        .map((item) => [conceptMeaning(item), item.TextValue ?? item.UID ?? code(item.ConceptCodeSequence)?.meaning ?? null]),
    ),
    imagingMeasurements: imaging ? { groupCount: groups.length, measurementGroups: groups } : null,
    dcmjsAdapter: dcmjsAdapter(dataset, groups),
  };
  process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  return 0;
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (error) {
  process.stderr.write(`parse_sr.mjs: ${error.stack || error}\n`);
  process.exitCode = 1;
}
